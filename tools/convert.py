"""Convert checkpoints: dense models in (Hugging Face, DeepSpeed ZeRO, Megatron-LM), Hugging Face out.

    python tools/convert.py import-hf        HF_DIR       OUT [--name N] [--vocab-size V] [--dtype D]
    python tools/convert.py import-deepspeed ZERO_DIR     OUT [--tag T] [--hf-config DIR] [--name N] [--dtype D]
    python tools/convert.py import-megatron  MEGATRON_DIR OUT [--name N] [--dtype D]
    python tools/convert.py export-hf        CHECKPOINT   OUT [--arch minimax_m3|llama|mistral|qwen2|qwen3|qwen3_moe|mixtral]

An import writes a megatron-core dist checkpoint (reshardable to any TP/PP/EP layout) plus
OUT/conf/recipe/<name>.yaml, and prints the train.py command that starts MSA-CPT from it.
Conversion runs on the CPU (CUDA is hidden from this process). Errors are one line, exit code 2,
and leave nothing at OUT.
"""

import argparse
import logging
import os
import re
import sys
import warnings

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # models are built on the meta device, tensors live on the CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from msa_megatron.convert import ConvertError  # noqa: E402

DTYPE = dict(choices=["auto", "fp32", "bf16"], default="auto", help="stored dtype (auto: the source's)")


def parse(argv):
    p = argparse.ArgumentParser(prog="tools/convert.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("import-hf", "a Hugging Face directory (config.json + *.safetensors)"),
                       ("import-deepspeed", "a DeepSpeed ZeRO (stage 1-3) checkpoint directory"),
                       ("import-megatron", "a Megatron-LM checkpoint directory (torch_dist or legacy per-rank files)")):
        s = sub.add_parser(name, help=f"{what} -> our dist checkpoint")
        s.add_argument("source")
        s.add_argument("out", help="new directory for the checkpoint (must not exist or be empty)")
        s.add_argument("--name", help="model.name and recipe name (default: OUT's directory name)")
        s.add_argument("--dtype", **DTYPE)
        if name == "import-hf":
            s.add_argument("--vocab-size", type=int, help="the training tokenizer's size (checked against the embedding)")
        if name == "import-deepspeed":
            s.add_argument("--tag", help="checkpoint tag, e.g. global_step100 (default: the 'latest' file)")
            s.add_argument("--hf-config", help="directory with the config.json of Hugging Face-named modules (default: SOURCE)")
    s = sub.add_parser("export-hf", help="our checkpoint -> a Hugging Face directory")
    s.add_argument("source", help="a checkpoint directory (or a training run's checkpoints/ directory)")
    s.add_argument("out")
    s.add_argument("--arch", default="minimax_m3", help="minimax_m3 (default), llama, mistral, qwen2, qwen3, qwen3_moe, mixtral")
    s.add_argument("--vocab-size", type=int, help="embedding rows to write (default: the imported source's)")
    s.add_argument("--dtype", **DTYPE)
    return p.parse_args(argv)


def recipe_name(args) -> str:
    name = args.name or os.path.basename(os.path.normpath(args.out))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConvertError(f"--name={name!r}: use letters, digits, '.', '_' and '-'")
    return name


def run(args) -> None:
    from msa_megatron.convert import writer

    writer.check_destination(args.out)  # before any work

    if args.command == "export-hf":
        from msa_megatron.convert.export import export_hf

        s = export_hf(args.source, args.out, arch=args.arch, vocab_size=args.vocab_size, dtype=args.dtype)
        print(f"exported {args.source} -> {args.out} ({s['model_type']}): {s['written_tensors']} tensors, vocab {s['vocab_rows']}")
        for line in s["dropped"]:
            print(f"  dropped: {line}")
        return
    name = recipe_name(args)
    if args.command == "import-hf":
        from msa_megatron.convert.hf import import_hf

        result = import_hf(args.source, name, vocab_size=args.vocab_size, dtype=args.dtype)
    elif args.command == "import-deepspeed":
        from msa_megatron.convert.deepspeed_zero import import_deepspeed

        result = import_deepspeed(args.source, name, tag=args.tag, hf_config=args.hf_config, dtype=args.dtype)
    else:
        from msa_megatron.convert.megatron_lm import import_megatron

        result = import_megatron(args.source, name, dtype=args.dtype)
    s = writer.write(args.out, result, name)
    out = os.path.abspath(args.out)
    print(f"imported {args.source} ({s['format']}, {s['model_type']}) -> {args.out}")
    print(f"  mapped: {s['mapped_source_tensors']} source tensors -> {s['written_tensors']} parameters ({', '.join(s['dtypes'])})")
    print(f"  dropped: {'; '.join(s['dropped']) if s['dropped'] else 'nothing'}")
    print(f"  created fresh at checkpoint.init_from: {s['fresh_at_init_from']}")
    print(f"  train: python train.py --config-dir {out}/conf recipe={name} stage=msa_cpt checkpoint.init_from={out}")


def main(argv) -> int:
    args = parse(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    try:
        run(args)
    except ConvertError as e:
        print(f"convert error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
