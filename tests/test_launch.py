"""Process-group setup as launchers call it, with CUDA and the process group stubbed out (no GPU here)."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import eval_gen
from infra import parallel


@pytest.fixture
def fake_launch(monkeypatch):
    """CUDA with `visible` devices and a process group that records its arguments instead of starting."""
    seen = {}

    def launch(local_rank, visible):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.__setitem__("set_device", d))
        monkeypatch.setattr(dist, "init_process_group",
                            lambda backend, **kw: seen.update(backend=backend, timeout=kw.get("timeout")))
        monkeypatch.setattr(dist, "get_rank", lambda: 8 + local_rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: 16)
        return seen
    return launch


@pytest.mark.parametrize("local_rank,visible,gpu", [(3, 8, 3), (3, 1, 0), (5, 2, 1)])
def test_cuda_ordinal_is_local_rank_modulo_the_visible_devices(fake_launch, local_rank, visible, gpu):
    seen = fake_launch(local_rank, visible)
    assert parallel.setup(120) == (8 + local_rank, gpu, 16, True)     # train.py's device is cuda:{gpu}
    assert seen == {"set_device": gpu, "backend": "nccl", "timeout": timedelta(seconds=120)}


def test_eval_gen_passes_its_dist_timeout_to_the_process_group(fake_launch, tmp_path, monkeypatch):
    class Started(Exception):
        pass
    seen = fake_launch(0, 1)

    def start(backend, **kw):
        seen.update(backend=backend, timeout=kw.get("timeout"))
        raise Started          # main stops here, before it reads data or a model
    monkeypatch.setattr(dist, "init_process_group", start)
    (tmp_path / "config.json").write_text("{}")
    args = ["--model", str(tmp_path), "--task", "arc_gen", "--data", "x.jsonl"]
    assert eval_gen.parse_args(args).dist_timeout_s == 3600
    with pytest.raises(Started):
        eval_gen.main(args + ["--device", "cpu", "--dist_timeout_s", "77"])
    assert seen == {"backend": "gloo", "timeout": timedelta(seconds=77)}     # --device cpu: no set_device
