"""GPU check: LoRA training steps on a randomly initialised Phi-3-mini-architecture model (nothing downloaded).

    python scripts/gpu_check.py                    # CUDA: bf16 LoRA, then QLoRA nf4 if bitsandbytes imports
    python scripts/gpu_check.py --tiny --steps 2   # any machine: a tiny model, to check the script itself

Prints, per mode: tokens/s, peak GPU memory, and model FLOPs utilisation. FLOPs are counted as 4 x params per
trained token for LoRA on a frozen base (forward 2N + backward through activations 2N; no base weight gradients),
against the chip's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s). It finishes in a few minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def build_model(tiny: bool, dtype: torch.dtype, quantize: bool):
    from transformers import Phi3Config, Phi3ForCausalLM

    if tiny:
        config = Phi3Config(vocab_size=32064, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    else:  # Phi-3-mini-4k-instruct's architecture (3.8B parameters)
        config = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Phi3ForCausalLM(config).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if quantize:
        model = _to_nf4(model, dtype)
    return model, n_params


def _to_nf4(model, dtype):
    """Replace every decoder Linear by a bitsandbytes 4-bit nf4 Linear holding the same (random) weights."""
    import bitsandbytes as bnb

    for name, module in list(model.model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data)
                setattr(module, child_name, q.cuda())
    torch.cuda.empty_cache()
    return model


def run_mode(name: str, args, dtype, quantize: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, n_params = build_model(args.tiny, dtype, quantize)
    model.config.use_cache = False
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = "cuda" if on_cuda else "cpu"
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=on_cuda):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if on_cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    tokens = args.batch * args.seq
    result = {"mode": name, "params": n_params, "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "median_step_s": round(median, 4), "min_step_s": round(times[0], 4), "max_step_s": round(times[-1], 4),
              "tokens_per_s": round(tokens / median, 1)}
    if on_cuda:
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
        achieved = 4 * n_params * tokens / median / 1e12
        result.update({"gpu": gpu, "achieved_tflops": round(achieved, 1),
                       "mfu": round(achieved / peak, 3) if peak else None})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU check of the script)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--modes", default="bf16_lora,qlora_nf4")
    args = parser.parse_args()
    results = []
    for mode in args.modes.split(","):
        if mode == "qlora_nf4":
            if not torch.cuda.is_available():
                print(json.dumps({"mode": mode, "skipped": "needs CUDA (bitsandbytes nf4)"}))
                continue
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                print(json.dumps({"mode": mode, "skipped": f"bitsandbytes not importable: {exc}"}))
                continue
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        res = run_mode(mode, args, dtype, quantize=(mode == "qlora_nf4"))
        results.append(res)
        print(json.dumps(res), flush=True)
    print("\n| mode | params | batch x seq | tokens/s | peak GiB | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['params'] / 1e9:.2f}B | {r['batch']}x{r['seq']} | {r['tokens_per_s']} | "
              f"{r.get('peak_mem_gib', '-')} | {r.get('achieved_tflops', '-')} | {r.get('mfu', '-')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
