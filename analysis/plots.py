"""One figure per analysis (title, axes, legend); ``draw(fig, result)``."""

from __future__ import annotations

from typing import Any


def redundancy(fig: Any, r: dict[str, Any]) -> None:
    """Geometric redundancy (left, log scale) and proximal share at each eps (right), image
    (solid) vs text (dashed); one colour per eps."""
    n = len(r["image"]["geometric"])
    xs = list(range(n))
    ax1, ax2 = fig.subplots(1, 2)
    colours = {e: f"C{i}" for i, e in enumerate(r["image"]["proximal"])}
    for t, style in (("image", "-"), ("text", "--")):
        ax1.plot(xs, [v if v is not None else float("nan") for v in r[t]["geometric"]], style, marker="o",
                 color="C0" if t == "image" else "C1", label=f"{t} tokens")
        for e, vals in r[t]["proximal"].items():
            ax2.plot(xs, [v if v is not None else float("nan") for v in vals], style, marker=".", color=colours[e],
                     label=f"{t}, ε = {e}")
    ax1.set_yscale("log")
    ax1.set(title="geometric: mean cosine distance", xlabel="layer ℓ", ylabel="mean 1 − cos(h(ℓ−1), h(ℓ)), log scale")
    ax2.set(title="proximal: share below ε", xlabel="layer ℓ",
            ylabel="share of tokens with 1 − cos < ε", ylim=(0, 1.02))
    ax2.axvline(r["heuristic_layer"] - 0.5, color="grey", lw=1, ls=":",
                label=f"heuristic k = {r['heuristic_layer']} (image, ε = 0.05 ≥ {r.get('threshold', 0.5)})")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    k = r.get("insert_layer", 0)
    fig.suptitle(f"Layer redundancy, image vs text tokens ({r['model']}, {r['samples']} samples"
                 + (f", late entry at k = {k})" if k else ")"))


def attention(fig: Any, r: dict[str, Any]) -> None:
    """VAR heat map (layer × head) and its per-layer mean."""
    ax1, ax2 = fig.subplots(1, 2)
    im = ax1.imshow(r["var"], aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(im, ax=ax1, label="VAR")
    ax1.set(title="VAR per layer and head", xlabel="head", ylabel="layer")
    ax2.plot(range(len(r["var_layer"])), r["var_layer"], marker="o", label="mean over heads")
    ax2.set(title="VAR per layer", xlabel="layer", ylabel="attention mass on image tokens")
    ax2.legend()
    fig.suptitle(f"Visual Attention Ratio of the answer token ({r['samples']} samples)")


def lens(fig: Any, r: dict[str, Any]) -> None:
    """Share of image tokens whose top tokens hit an answer word, per layer."""
    ax = fig.subplots()
    ax.plot(r["layers"], r["match"], marker="o", label=f"top-{r['top']} contains an answer word")
    for x, tops in zip(r["layers"], r["top_tokens"]):
        if tops:
            ax.annotate(tops[0][0][:10], (x, r["match"][x + 1]), fontsize=7, rotation=30)
    ax.set(title="Logit lens of image tokens (label: most frequent top-1 token)",
           xlabel="layer (−1 = projector output)", ylabel="share of image tokens")
    ax.legend()


def masking(fig: Any, r: dict[str, Any]) -> None:
    """Accuracy and answer loss vs k, masking vs skipping."""
    ax1, ax2 = fig.subplots(1, 2)
    for mode, label in (("skip", "skipping (late entry)"), ("mask", "masking")):
        ax1.errorbar(r["k"], r[mode]["accuracy"], yerr=r[mode].get("accuracy_se"), marker="o", capsize=3,
                     label=label + (" (± SE)" if "accuracy_se" in r[mode] else ""))
        ax2.plot(r["k"], r[mode]["loss"], marker="o", label=label)
    ax1.set(title="accuracy", xlabel="k (image absent from layers 0..k−1)", ylabel="answer accuracy")
    ax2.set(title="answer loss", xlabel="k", ylabel="mean cross-entropy")
    ax1.legend()
    ax2.legend()
    fig.suptitle(f"Masking vs skipping the image tokens ({r['samples']} samples)")


def injection(fig: Any, r: dict[str, Any]) -> None:
    """Accuracy vs the injection layer n."""
    ax = fig.subplots()
    ax.plot(r["n"], r["accuracy"], marker="o", label="random image, correct image states from layer n on")
    ax.set(title=f"Injection of the correct image's states ({r['samples']} samples)",
           xlabel="n (first layer receiving the correct image rows)", ylabel="answer accuracy")
    ax.legend()


def early_exit(fig: Any, r: dict[str, Any]) -> None:
    """Left: accuracy heat map over (k, m), each cell annotated with accuracy and FLOPs.
    Right: accuracy vs FLOPs fraction, one line per k across m, and late entry alone."""
    import numpy as np

    ax0, ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    ks = sorted({p["k"] for p in r["points"]})
    ms = sorted({p["m"] for p in r["points"]})
    grid = np.full((len(ks), len(ms)), np.nan)
    for p in r["points"]:
        i, j = ks.index(p["k"]), ms.index(p["m"])
        grid[i, j] = p["accuracy"]
        ax0.text(j, i, f"{p['accuracy']:.2f}\n{p['flops']:.2f}", ha="center", va="center", fontsize=7,
                 color="white" if p["accuracy"] < np.nanmean([q["accuracy"] for q in r["points"]]) else "black")
    im = ax0.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax0, label="answer accuracy")
    ax0.set_xticks(range(len(ms)), [str(m) for m in ms])
    ax0.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax0.set(title="accuracy (top) / FLOPs (bottom)", xlabel="m (image rows leave after layer m−1)",
            ylabel="k (image rows enter at layer k)")
    for k in ks:
        pts = sorted((p for p in r["points"] if p["k"] == k), key=lambda p: p["m"])
        ax.plot([p["flops"] for p in pts], [p["accuracy"] for p in pts], marker="o", label=f"k = {k}, m = {pts[0]['m']}..{pts[-1]['m']}")
    late = sorted((p for p in r["points"] if p["m"] == r["num_layers"]), key=lambda p: p["flops"])
    ax.plot([p["flops"] for p in late], [p["accuracy"] for p in late], "k--", lw=1, label="late entry alone (m = N)")
    ax.set(title="accuracy vs FLOPs", xlabel="FLOPs / stock FLOPs", ylabel="answer accuracy")
    ax.legend(fontsize=7)
    fig.suptitle(f"Early exit of image tokens ({r['samples']} samples)")
