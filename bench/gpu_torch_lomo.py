"""PyTorch with the official LOMO optimizer on one GPU, at the shapes bench/gpu_bench measures.

The baseline lomo's CUDA backend is compared with (docs/PERFORMANCE.md): transformers'
LlamaForCausalLM with random weights of a real LLaMA shape, stored in bf16 as the LOMO paper trains
them, SDPA attention (FlashAttention kernels on a recent GPU), optional activation checkpointing,
and `lomo_optim.Lomo` (PyPI `lomo-optim`, the optimizer as its authors published it) updating each
parameter from its gradient hook inside `fused_backward`. Prints one line per row: step time,
tokens/s and the peak memory PyTorch's allocator reports. Needs torch with CUDA, transformers and
lomo-optim; asserts that the update really is LOMO's (every parameter hooked, no .grad kept, the
weights move).

    python3 bench/gpu_torch_lomo.py --model 7b --seq 1024 --batch 1 --checkpointing off --steps 3
"""

import argparse
import sys
import time

SHAPES = {  # hidden, intermediate, layers, heads (as bench/gpu_bench.cc's presets)
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "1b": (2048, 5504, 16, 16),
}


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", choices=("on", "off"), default="off")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from lomo_optim import Lomo
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads = SHAPES[args.model]
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(1)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.train()
    if args.checkpointing == "on":
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = Lomo(model, lr=args.lr)
    generator = torch.Generator(device="cuda").manual_seed(2)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device="cuda",
                          generator=generator)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    params = [p for p in model.parameters() if p.requires_grad]
    hooked = sum(1 for p in params
                 if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None))
    probe = model.model.layers[0].self_attn.q_proj.weight
    before = probe.detach().clone()

    torch.cuda.reset_peak_memory_stats()
    step_seconds = []
    for step in range(args.steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        optimizer.fused_backward(loss, args.lr)
        torch.cuda.synchronize()
        if step > 0:
            step_seconds.append(time.perf_counter() - start)
        del logits, loss
        if step == 0:
            leftover = sum(1 for p in params if p.grad is not None)
            moved = not torch.equal(before, probe.detach())
            if leftover or not moved:
                sys.exit(f"not a LOMO step: {hooked}/{len(params)} parameters hooked, "
                         f"{leftover} .grad left, weights moved: {moved}")
    best = min(step_seconds)
    tokens = args.batch * args.seq
    print(f"torch_lomo model={args.model} seq={args.seq} batch={args.batch} "
          f"checkpointing={args.checkpointing} torch={torch.__version__} "
          f"gpu={torch.cuda.get_device_name()} step_ms={best * 1e3:.1f} "
          f"tokens_per_s={tokens / best:.0f} hooked={hooked}/{len(params)} "
          f"peak_allocated_gib={torch.cuda.max_memory_allocated() / 2**30:.2f} "
          f"peak_reserved_gib={torch.cuda.max_memory_reserved() / 2**30:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
