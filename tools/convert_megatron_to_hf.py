"""Export a Megatron torch_dist checkpoint (any TP/PP layout) as a Hugging Face model directory.

Writes safetensors shards + model.safetensors.index.json + config.json, and copies the tokenizer files and
generation_config.json from the source HF directory (default: the copy stored by convert_hf_to_megatron.py in
the checkpoint). ``transformers`` loads the result as is. Runs in one process, without torchrun:

    python tools/convert_megatron_to_hf.py --ckpt /ckpt/run1/iter_0000200 \
        --hf-config-dir /models/DeepSeek-R1-Distill-Qwen-1.5B --out /export/popd-step200
"""

from __future__ import annotations

import argparse
import logging

from megatron_opd.model.hf_conversion import megatron_to_hf
from megatron_opd.utils.errors import expected_errors_exit
from megatron_opd.utils.lifeline import bind_child_processes

bind_child_processes(__name__)  # its spawned helpers (checkpoint writers) die with it


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="torch_dist checkpoint directory (holds metadata.json)")
    p.add_argument("--out", required=True, help="output HF directory (must not exist unless --overwrite)")
    p.add_argument(
        "--hf-config-dir",
        default=None,
        help="source HF directory: config.json, tokenizer and generation config are copied from it",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the written tensors (default: the model's params_dtype)",
    )
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, in GiB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    megatron_to_hf(
        args.ckpt,
        args.out,
        hf_config_dir=args.hf_config_dir,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    with expected_errors_exit():  # bad input, missing or corrupt files: one line, exit code 2
        main()
