"""Resume store: each finished block's quantized tensors under the run's work directory (``--resume``)."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open

from ..errors import RcsrError
from ..format import QuantizedTensor, QuantSpec
from ..storage import save_file_atomic
from .config import QuantizeConfig


class WorkDir:
    """Per-block results of an interrupted-or-running quantization (for ``--resume``)."""

    def __init__(self, path: Path, cfg: QuantizeConfig, model_id: str):
        self.path = Path(path)
        # as it reads back from run.json (tuples become lists), so that a resumed run compares equal
        self.meta = json.loads(json.dumps({"config": asdict(cfg), "model": model_id, "format": 2}))

    def open(self, resume: bool) -> set[int]:
        """Create or validate; return the indices of finished blocks (to skip)."""
        meta_file = self.path / "run.json"
        if self.path.exists() and resume and meta_file.exists():
            old = json.loads(meta_file.read_text())
            if old != self.meta:
                raise RcsrError(f"--resume: {self.path} belongs to a run with different settings; remove it or drop --resume")
            return {int(p.stem.split("_")[1]) for p in self.path.glob("block_*.safetensors")}
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        meta_file.write_text(json.dumps(self.meta, indent=1))
        return set()

    def save_block(self, idx: int, results: dict[str, QuantizedTensor]) -> None:
        tensors, infos = {}, {}
        for name, r in results.items():
            tensors[f"{name}.codes"] = r.codes.contiguous()
            tensors[f"{name}.scale"] = r.scale.contiguous()
            tensors[f"{name}.zero"] = r.zero.contiguous()
            if r.g_idx is not None:
                tensors[f"{name}.g_idx"] = r.g_idx.contiguous()
            infos[name] = {"info": r.info, "spec": [r.spec.bits, r.spec.group_size, r.spec.sym]}
        save_file_atomic(tensors, self.path / f"block_{idx:04d}.safetensors", metadata={"info": json.dumps(infos)})

    def has_block(self, idx: int) -> bool:
        return (self.path / f"block_{idx:04d}.safetensors").exists()

    def load_block(self, idx: int) -> dict[str, QuantizedTensor]:
        out: dict[str, QuantizedTensor] = {}
        with safe_open(str(self.path / f"block_{idx:04d}.safetensors"), "pt") as f:
            infos = json.loads(f.metadata()["info"])
            keys = set(f.keys())
            for name, entry in infos.items():
                g = f.get_tensor(f"{name}.g_idx") if f"{name}.g_idx" in keys else None
                out[name] = QuantizedTensor(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale"),
                                            f.get_tensor(f"{name}.zero"), g, QuantSpec(*entry["spec"]),
                                            info=entry["info"])
        return out
