"""What a run needs per device: memory at start-up (the load's peak, apart from training's)."""
import resource

import torch


def load_report(seconds: float, device, sharded: bool) -> str:
    """One line on the model load: its time and peak memory (GPU allocator on CUDA, else host RSS). The
    CUDA peak counter is reset afterwards, so the training peak (metrics' mem_gb) is the loop's own."""
    how = "sharded, each rank its part" if sharded else "whole model per rank"
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return f"model load ({how}): {seconds:.1f} s, peak GPU memory {peak:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB on Linux
    return f"model load ({how}): {seconds:.1f} s, peak host RSS {rss:.2f} GiB"
