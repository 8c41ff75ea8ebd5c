"""Whole-model greedy decoding: ``moekit generate`` against transformers ``generate`` (and vLLM's CPU build when
its separate environment exists) on ``moekit export`` of the same run, at batch 1 and 16.

    python benchmarks/decode_vs_peers.py RUN [--new-tokens 128] [--rounds 3] [--busy]

Every engine decodes exactly ``--new-tokens`` tokens per prompt (end of document ignored), greedy, with its KV
cache, from the same prompts (the first 32 bytes of validation documents, BOS first). tokens/s = new tokens of
the batch / wall time of the call, median of ``--rounds`` after one warm-up. moekit runs with its default
thread policy (``--threads auto``); transformers with torch's default thread count and with one thread (its
better figure is the baseline). vLLM runs from the environment of ``benchmarks/make_vllm_env.sh``
(``.venv-vllm`` or ``$MOEKIT_VLLM_PYTHON``) in a subprocess. ``--busy`` repeats moekit's batch-1 figure while
another process keeps both cores busy (a two-thread matrix-product loop) and reports the share kept.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

VLLM_SNIPPET = r"""
import json, sys, time
from vllm import LLM, SamplingParams
path, new_tokens, rounds, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True, skip_tokenizer_init=True)
params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                        detokenize=False)
out = {}
for batch in (1, 16):
    inputs = [{"prompt_token_ids": p} for p in prompts[:batch]]
    llm.generate(inputs, params, use_tqdm=False)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter(); res = llm.generate(inputs, params, use_tqdm=False); times.append(time.perf_counter() - t0)
    times.sort()
    out[str(batch)] = {"tokens_per_s": batch * new_tokens / times[len(times) // 2],
                       "first": list(res[0].outputs[0].token_ids[:20])}
print("VLLM_RESULT " + json.dumps(out))
"""

BUSY_SNIPPET = r"""
import torch, time
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
end = time.time() + 600
while time.time() < end:
    a @ a
"""


def prompts_from_corpus(n: int) -> list[list[int]]:
    from moekit.data import BOS_ID, load_corpus

    corpus = load_corpus(None)
    val = corpus.val
    starts = [i for i in range(len(val)) if int(val[i]) == BOS_ID][: n * 3 : 3]
    return [[int(t) for t in val[s:s + 33]] for s in starts[:n]]


def median_rate(fn, tokens: int, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def moekit_rates(model, prompts, new_tokens, rounds) -> dict:
    from moekit import generate

    out = {}
    for batch in (1, 16):
        p = prompts[:batch]
        out[batch] = median_rate(lambda: generate(model, p, new_tokens, eos_id=None), batch * new_tokens, rounds)
    first = generate(model, prompts[:1], 20, eos_id=None)[0].new_ids
    return out, first


def hf_rates(path, prompts, new_tokens, rounds, threads) -> tuple[dict, list[int]]:
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out = {}
        for batch in (1, 16):
            p = prompts[:batch]
            width = max(len(x) for x in p)
            ids = torch.tensor([[0] * (width - len(x)) + x for x in p])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in p])

            def run():
                with torch.no_grad():
                    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out[batch] = median_rate(run, batch * new_tokens, rounds)
        with torch.no_grad():
            first = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=20, min_new_tokens=20,
                                   do_sample=False, pad_token_id=0)[0, len(prompts[0]):].tolist()
        return out, first
    finally:
        torch.set_num_threads(before)


def vllm_rates(path, prompts, new_tokens, rounds):
    python = os.environ.get("MOEKIT_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        return None, "no vLLM environment (bash benchmarks/make_vllm_env.sh)"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(os.cpu_count() or 2)}
    proc = subprocess.run([python, "-c", VLLM_SNIPPET, str(path), str(new_tokens), str(rounds), json.dumps(prompts)],
                          capture_output=True, text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("VLLM_RESULT "):
            return json.loads(line[len("VLLM_RESULT "):]), None
    return None, "vLLM failed: " + (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    from moekit.hf.export import export_hf
    from moekit.train import load_run

    model, _ = load_run(Path(args.run))
    prompts = prompts_from_corpus(16)
    with tempfile.TemporaryDirectory() as tmp:
        export = export_hf(args.run, Path(tmp) / "hf")
        rows = {}
        rows["moekit generate (threads auto)"], mk_first = moekit_rates(model, prompts, args.new_tokens, args.rounds)
        default_threads = torch.get_num_threads()
        rows[f"transformers generate ({default_threads} threads)"], hf_first = hf_rates(
            export, prompts, args.new_tokens, args.rounds, default_threads)
        rows["transformers generate (1 thread)"], _ = hf_rates(export, prompts, args.new_tokens, args.rounds, 1)
        vllm_note = "skipped (--no-vllm)"
        if not args.no_vllm:
            vres, vllm_note = vllm_rates(export, prompts, args.new_tokens, args.rounds)
            if vres is not None:
                rows["vLLM CPU (vllm-cpu)"] = {int(k): v["tokens_per_s"] for k, v in vres.items()}
                vllm_note = f"greedy first 20 tokens equal to moekit's: {vres['1']['first'] == mk_first}"
    print(f"Greedy, {args.new_tokens} new tokens per prompt, median of {args.rounds}, torch "
          f"{torch.__version__}, {default_threads} threads available.\n")
    print("| engine | batch 1 tokens/s | batch 16 tokens/s |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r[1]:.0f} | {r[16]:.0f} |")
    hf_best = {b: max(v[b] for k, v in rows.items() if k.startswith("transformers")) for b in (1, 16)}
    mk = rows["moekit generate (threads auto)"]
    print(f"\nmoekit / best transformers: batch 1 {mk[1] / hf_best[1]:.2f}x, batch 16 {mk[16] / hf_best[16]:.2f}x")
    if "vLLM CPU (vllm-cpu)" in rows:
        print(f"moekit / vLLM: batch 1 {mk[1] / rows['vLLM CPU (vllm-cpu)'][1]:.2f}x, "
              f"batch 16 {mk[16] / rows['vLLM CPU (vllm-cpu)'][16]:.2f}x")
    print(f"greedy first 20 tokens equal (moekit vs transformers): {mk_first == hf_first}; vLLM: {vllm_note}")
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", BUSY_SNIPPET])
        try:
            time.sleep(2)
            busy_rates, _ = moekit_rates(model, prompts, args.new_tokens, args.rounds)
        finally:
            busy.kill()
        print(f"\nbusy machine (a 2-thread matmul loop beside it): moekit batch 1 {busy_rates[1]:.0f} tokens/s = "
              f"{busy_rates[1] / mk[1]:.0%} of idle; batch 16 {busy_rates[16]:.0f} tokens/s = "
              f"{busy_rates[16] / mk[16]:.0%} of idle")


if __name__ == "__main__":
    main()
