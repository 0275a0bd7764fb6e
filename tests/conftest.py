"""Process-wide test settings that must hold before any test module is imported.

TRITON_INTERPRET is read when triton is first imported (triton.language builds its own @jit helpers then), and
megatron.core imports triton. The Triton loss tests run interpreted on CPU only if the variable is set before
the first test module that imports megatron.core, so it is set here.
"""

import time

import pytest

from megatron_opd.parallel.cpu_compat import use_triton_interpreter

use_triton_interpreter()


@pytest.fixture(scope="session")
def tiny_toy_models(tmp_path_factory):
    """The toy teacher and student at a tiny recipe, made once for the whole test run (about 20 s).

    Returns (ToyModels, its cache folder, the seconds the first build took).
    """
    from megatron_opd.toy.models import ToyRecipe, make_toy_models

    recipe = ToyRecipe(digits=2, num_train_prompts=24, num_eval_problems=8, batch_size=16, teacher_steps=30,
                       student_steps=6, warmup_steps=5)  # fmt: skip
    cache = str(tmp_path_factory.mktemp("toy_cache"))
    t0 = time.perf_counter()
    models = make_toy_models(recipe, cache)
    return models, cache, time.perf_counter() - t0


@pytest.fixture(scope="module")
def own_process_group():
    """Leave no process group behind for the modules that follow: for modules that may start a one-process group
    in the pytest process, through ``pytestmark = pytest.mark.usefixtures("own_process_group")``."""
    import torch.distributed as dist

    from megatron_opd.parallel.state import destroy_parallel

    started_here = not dist.is_initialized()
    yield
    if started_here:
        destroy_parallel()
