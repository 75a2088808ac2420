"""One figure per analysis (title, axes, legend); ``draw(fig, result)``."""

from __future__ import annotations

from typing import Any


def redundancy(fig: Any, r: dict[str, Any]) -> None:
    """Geometric redundancy (left) and proximal share at each eps (right), image vs text."""
    n = len(r["image"]["geometric"])
    xs = list(range(n))
    ax1, ax2 = fig.subplots(1, 2)
    for t, style in (("image", "-"), ("text", "--")):
        ax1.plot(xs, [v if v is not None else float("nan") for v in r[t]["geometric"]], style, marker="o", label=t)
        for e, vals in r[t]["proximal"].items():
            ax2.plot(xs, [v if v is not None else float("nan") for v in vals], style, marker=".", label=f"{t}, ε={e}")
    ax1.set(title="geometric redundancy", xlabel="layer ℓ", ylabel="mean cosine distance h(ℓ−1) → h(ℓ)")
    ax2.set(title="proximal redundancy", xlabel="layer ℓ", ylabel="share of tokens with distance < ε", ylim=(0, 1.02))
    ax2.axvline(r["heuristic_layer"] - 0.5, color="grey", lw=1, ls=":", label=f"heuristic k = {r['heuristic_layer']}")
    ax1.legend()
    ax2.legend(fontsize=6)
    fig.suptitle(f"Layer redundancy ({r['model']}, {r['samples']} samples)")


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
        ax1.plot(r["k"], r[mode]["accuracy"], marker="o", label=label)
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
    """Accuracy vs FLOPs fraction, one line per k across m."""
    ax = fig.subplots()
    ks = sorted({p["k"] for p in r["points"]})
    for k in ks:
        pts = sorted((p for p in r["points"] if p["k"] == k), key=lambda p: p["m"])
        ax.plot([p["flops"] for p in pts], [p["accuracy"] for p in pts], marker="o", label=f"k = {k} (m = {pts[0]['m']}..{pts[-1]['m']})")
    late = sorted((p for p in r["points"] if p["m"] == r["num_layers"]), key=lambda p: p["flops"])
    ax.plot([p["flops"] for p in late], [p["accuracy"] for p in late], "k--", lw=1, label="late entry alone (m = N)")
    ax.set(title="Early exit of image tokens: accuracy vs FLOPs", xlabel="FLOPs / stock FLOPs", ylabel="answer accuracy")
    ax.legend(fontsize=7)
