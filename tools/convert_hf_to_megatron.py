"""Convert a Hugging Face checkpoint (Qwen2, Llama; safetensors) into a Megatron torch_dist checkpoint.

The result loads in the trainer at any tensor/pipeline-parallel size (set ``model.hf_path`` to the HF directory
or read the model config from ``<out>/megatron_opd_model.json``). Runs in one process, without torchrun:

    python tools/convert_hf_to_megatron.py --hf-dir /models/DeepSeek-R1-Distill-Qwen-1.5B \
        --out /ckpt/r1-distill-qwen-1.5b-mcore --params-dtype bfloat16
"""

from __future__ import annotations

import argparse
import logging

from megatron_opd.model.hf_conversion import hf_to_megatron
from megatron_opd.utils.errors import expected_errors_exit
from megatron_opd.utils.lifeline import bind_child_processes

bind_child_processes(__name__)  # its spawned helpers (checkpoint writers) die with it


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument(
        "--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)"
    )
    p.add_argument(
        "--params-dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the saved weights (default: the HF config's torch_dtype)",
    )
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=None,
        help="Megatron's vocabulary padding multiple (default: model.make_vocab_size_divisible_by)",
    )
    p.add_argument(
        "--transformer-impl",
        choices=["auto", "local", "transformer_engine"],
        default=None,
        help="layer spec of the model built for saving (default: auto)",
    )
    p.add_argument(
        "--target-tp",
        type=int,
        default=None,
        help="fail early if this tensor-parallel size cannot split the heads / KV groups / MLP",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hf_to_megatron(
        args.hf_dir,
        args.out,
        params_dtype=args.params_dtype,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        transformer_impl=args.transformer_impl,
        target_tp=args.target_tp,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


if (
    __name__ == "__main__"
):  # the guard matters: dist_checkpointing's saver spawns processes that re-import this
    with expected_errors_exit():  # bad input, missing or corrupt files: one line, exit code 2
        main()
