"""A trained model as a folder to ship: its encoders and its frozen tokenizer, small enough for a repository.

``OUT/checkpoints/step-N.pt`` holds the two trained encoders (EMA target and context; no predictor, no
optimizer state), the training config and step; ``OUT/tokenizer/`` the tokenizer record and shape encoder,
and the part of the tag vocabulary that the listed regions need. The vocabulary is a cache of the text
model's vectors (the digest does not cover it): a region that needs an entry the shipped one lacks embeds it
with the same offline text model when it is tokenised, so pruning it changes no token. The folder's files are
named by ``geojepa.workdir.ModelDir``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_contracts import ENTITIES, TAG_VOCAB, read_table, write_table
from geojepa.errors import GeoJepaError
from geojepa.model.jepa import load_checkpoint
from geojepa.tokens.tokenizer import load_tokenizer
from geojepa.tokens.vocab import wanted_entries
from geojepa.workdir import ModelDir, WorkDir

KEEP = ("encoder.", "target_encoder.")


def export_model(checkpoint: Path, tokenizer: Path, out: Path, vocab_for: list[Path] = (),
                 max_values_per_key: int = 100) -> dict:
    """Write the model folder ``out`` (see the module docstring); returns what was written with sizes."""
    checkpoint, out = Path(checkpoint), Path(out)
    state = load_checkpoint(checkpoint)
    tk = load_tokenizer(tokenizer)
    digest = state["config"].get("tokenizer_digest")
    if digest and digest != tk.digest:
        raise GeoJepaError(f"{checkpoint}: trained with tokenizer {digest}, not {tokenizer}'s {tk.digest}")
    if out.exists():
        raise GeoJepaError(f"{out}: exists; export into a new folder")
    tmp = ModelDir(out.with_name(f".{out.name}.tmp"))
    shutil.rmtree(tmp.path, ignore_errors=True)
    tmp.checkpoints_dir.path.mkdir(parents=True)
    tmp.tokenizer.path.mkdir()
    slim = {"step": state["step"], "epoch": state.get("epoch", 0), "config": state["config"],
            "model": {k: v for k, v in state["model"].items() if k.startswith(KEEP)}}
    torch.save(slim, tmp.checkpoints_dir / checkpoint.name)
    shutil.copy(tk.files.record_file, tmp.tokenizer.record_file)
    shutil.copy(tk.files.geometry_encoder, tmp.tokenizer.geometry_encoder)
    vocab = read_table(tk.vocab, TAG_VOCAB)
    if vocab_for:
        wanted: set = set()
        for w in vocab_for:
            tags = read_table(WorkDir(w).entities, ENTITIES, columns=["tags"])["tags"].to_pylist()
            wanted |= wanted_entries(([(k, v) for k, v in t] for t in tags), max_values_per_key)
        keep = [(k, v) in wanted for k, v in zip(vocab["key"].to_pylist(), vocab["value"].to_pylist(), strict=True)]
        vocab = vocab.filter(pa.array(keep))
    write_table(vocab, tmp.tokenizer.tag_vocab, TAG_VOCAB)
    tmp.export_record.write_text(json.dumps({
        "checkpoint": str(checkpoint), "step": state["step"], "tokenizer_digest": tk.digest,
        "vocabulary_entries": vocab.num_rows, "vocabulary_for": [Path(w).name for w in vocab_for],
        "modalities": state["config"].get("modalities"), "regions": state["config"].get("regions")}, indent=1))
    tmp.path.rename(out)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return {"out": str(out), "files": sizes, "megabytes": round(sum(sizes.values()) / 1e6, 2),
            "vocabulary_entries": int(pc.count(vocab["key"]).as_py())}
