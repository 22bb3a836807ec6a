"""The README's real-size table: every paper recipe x {Qwen2.5-3B, 7B} x TPU slices, each cell
measured by ``agentgym-jax plan`` (ahead-of-time compiles for the slice, from this CPU host).

    python bench/plan_table.py [--out docs/plan_table.json] [--only babyai,webarena] [--budget-min 60]

Resumable: finished cells are kept in the JSON file and skipped, so the table can be filled in
over several runs. Prints the markdown table at the end (also written next to the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from agentgym_jax.plan import SLICES as SLICE_TABLE

RECIPES = ("babyai", "webarena", "textcraft", "sciworld", "searchqa")
MODELS = ("Qwen2.5-7B", "Qwen2.5-3B")
SLICES = ("v5e-16", "v5p-8", "v4-32", "v5e-64")


def cell_key(recipe: str, model: str, slice_name: str) -> str:
    return f"{recipe}|{model}|{slice_name}"


def run_cell(recipe: str, model: str, slice_name: str, timeout_s: int) -> dict:
    out = f"/tmp/plan_{recipe}_{model}_{slice_name}.json"
    cmd = [
        sys.executable,
        "-m",
        "agentgym_jax.cli",
        "plan",
        "--config",
        f"configs/{recipe}_agentgym_rl.yaml",
        "--model",
        model,
        "--topology",
        slice_name,
        "--json",
        out,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"plan took over {timeout_s} s"}
    wall = time.perf_counter() - t0
    if not os.path.exists(out):
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:300], "wall_s": wall}
    with open(out) as f:
        rep = json.load(f)
    os.remove(out)
    rep["wall_s"] = round(wall, 1)
    return rep


def markdown(results: dict) -> str:
    lines = [
        "| recipe (batch x len) | model | slice | mesh | GiB/device (peak) | fits | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe in RECIPES:
        for model in MODELS:
            for sl in SLICES:
                r = results.get(cell_key(recipe, model, sl))
                if r is None:
                    continue
                shape = r.get("shape", "")
                if "error" in r and "functions" not in r:
                    lines.append(
                        f"| {recipe} {shape} | {model} | {sl} | | | error: {r['error']} | |"
                    )
                    continue
                # The verdict against the chip memory the planner uses now (v5e: the 15.75
                # GiB its compiler offers, not the 16 on the box).
                hbm = SLICE_TABLE[sl].hbm_gib
                errors = any(f["error"] for f in r["functions"].values())
                r["fits"] = not errors and r["peak_gib"] <= hbm
                r["hbm_gib"] = hbm
                mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
                micro = [c.split("=")[1] for c in r.get("config_changes", []) if "actor." in c]
                mesh += f", micro {micro[0]}" if micro else ""
                comp = sum(f["compile_s"] for f in r["functions"].values())
                if r["fits"]:
                    verdict = "yes"
                elif errors:
                    verdict = "no: does not compile"
                else:
                    verdict = f"no: {r.get('largest_term') or 'peak over the chip'}"
                lines.append(
                    f"| {recipe} {shape} | {model} | {sl} | {mesh} | {r['peak_gib']:.1f} of "
                    f"{r['hbm_gib']:g} | {verdict} | {comp:.0f} |"
                )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/plan_table.json")
    ap.add_argument("--only", help="comma-separated recipes")
    ap.add_argument("--models", help="comma-separated models")
    ap.add_argument("--slices", help="comma-separated slices")
    ap.add_argument("--budget-min", type=float, default=1e9, help="stop starting cells after this")
    ap.add_argument("--timeout-s", type=int, default=1800)
    a = ap.parse_args()
    results = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            results = json.load(f)
    recipes = a.only.split(",") if a.only else RECIPES
    models = a.models.split(",") if a.models else MODELS
    slices = a.slices.split(",") if a.slices else SLICES
    t0 = time.time()
    import yaml

    for recipe in recipes:
        with open(f"configs/{recipe}_agentgym_rl.yaml") as f:
            c = yaml.safe_load(f)
        d, r = c["data"], c.get("rollout", {})
        shape = (
            f"{d['train_batch_size'] * r.get('n', 1)} x "
            f"{d['max_prompt_length'] + d['max_response_length']}"
        )
        for model in models:
            for sl in slices:
                key = cell_key(recipe, model, sl)
                if key in results and "functions" in results[key]:
                    continue
                if (time.time() - t0) / 60 > a.budget_min:
                    print(f"budget spent; {key} and later cells left for the next run")
                    break
                print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
                rep = run_cell(recipe, model, sl, a.timeout_s)
                rep["shape"] = shape
                results[key] = rep
                os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
                with open(a.out, "w") as f:
                    json.dump(results, f, indent=1, sort_keys=True)
                print(
                    f"  fits={rep.get('fits')} peak={rep.get('peak_gib', 0):.1f} GiB "
                    f"wall={rep.get('wall_s')} s {rep.get('error', '')}",
                    flush=True,
                )
    table = markdown(results)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
