"""loadtest/kernel_ablate.py's cuts are line replacements in the kernels' sources: each must
still find its line, or the tool stops on the GPU (where every second counts)."""

from loadtest import kernel_ablate


def test_every_cut_still_applies():
    for kind in ("qgemm", "qgemv", "gemv", "wgmma"):
        source, _, cuts = kernel_ablate._sources(kind)
        for variant, pairs in cuts.items():
            assert kernel_ablate._cut(source, *pairs) != source, (kind, variant)
