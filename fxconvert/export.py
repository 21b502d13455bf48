"""`fxconvert.export`: write trained pipeline stages back as a Hugging Face checkpoint, `run/hf/`.

Why sharded: a rank holds only its own stages' weights, and gathering the whole model on
one rank to write a single `model.safetensors` would undo that (T5-3B's fp32 weights are
11 GB). So each stage's owner writes `model-<i+1:05d>-of-<N:05d>.safetensors` with that
stage's tensors under their transformers names, and rank 0 writes
`model.safetensors.index.json` (which `from_pretrained` follows) from the shards'
headers, never their data.

Names come from pipeline.json: each stage parameter's `hf_name`, and for a shared weight
(one tensor that transformers ties under several names, every stage holding a copy) its
`hf_names`. A shared weight is written once, by the lowest stage holding it, under its
first name. `from_pretrained` ties the other names to it, because the config copied
from the conversion is the one that tied them in the model that was converted.

Beside the weights, rank 0 copies config.json, generation_config.json (when the
conversion has one) and the tokenizer files byte for byte from the conversion directory:
only regular files inside it (`fxconvert.files`); a symlink out of it, a FIFO or a
directory under such a name is refused in one line, when the plan is checked.

Atomic like the checkpoints (`fxconvert.atomic_dir`): everything goes into `.<name>.tmp`
beside `run/hf`, which rank 0 creates marked as fxconvert's, and puts in place after checking
that every shard holds exactly the names it should, so a failed or killed export leaves no
`run/hf` (or the previous one). What a killed export left is removed by the next one: only
directories with the export's temporary names that hold fxconvert's marker; a user's directory
of such a name is left alone. `run/` must be on a filesystem every rank sees.
"""

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fxconvert import atomic_dir
from fxconvert import manifest as manifests
from fxconvert.errors import FxConvertError, printable
from fxconvert.files import fsync_path, read_copyable, why_not_copyable

INDEX = "model.safetensors.index.json"
PIPELINE = manifests.FILE
GENERATION_CONFIG = "generation_config.json"
# Names a copied file may not have: they would stand beside, or instead of, the weights written here.
_WEIGHTS_LIKE = re.compile(r"(\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)|\.index\.json)$", re.IGNORECASE)


class ExportError(FxConvertError):
    """The Hugging Face checkpoint could not be written."""


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


@dataclass
class ExportPlan:
    """What pipeline.json says about naming and files, as plain mappings.

    `names[i]` maps stage i's state-dict names to transformers names; `shared` maps a
    shared weight's state-dict name to (the stage that writes it, its transformers name);
    `files` are copied from the conversion directory; `unsaved[i]`, stage i's buffers that the
    eager model does not save (pipeline.json's `persistent: false`), which save_pretrained
    leaves out and `from_pretrained` would report as unexpected.
    """

    num_stages: int
    names: dict[int, dict[str, str]]
    shared: dict[str, tuple[int, str]]
    files: list[str]
    unsaved: dict[int, frozenset[str]] = field(default_factory=dict)

    def expected(self, stage: int) -> dict[str, str]:
        """Stage-state-dict name -> transformers name of what stage `stage` writes."""
        unsaved = self.unsaved.get(stage, frozenset())
        out = {n: hf for n, hf in self.names[stage].items() if n not in self.shared and n not in unsaved}
        out.update({n: hf for n, (owner, hf) in self.shared.items() if owner == stage})
        return out


def plan_from_manifest(manifest: "manifests.Manifest | dict", pipeline_dir) -> ExportPlan:
    """The naming and the files to copy, from pipeline.json (its record, or its parsed JSON, checked whole first);
    one-line errors when it is malformed."""
    directory = Path(pipeline_dir)
    if not isinstance(manifest, manifests.Manifest):
        try:
            manifest = manifests.Manifest.from_json(manifest, printable(directory / PIPELINE))
        except manifests.ManifestError as e:
            raise ExportError(str(e)) from None
    names = {s.index: {p.name: p.hf_name for p in s.parameters} for s in manifest.stages}
    shared = {name: (min(w.stages), w.hf_names[0]) for name, w in manifest.shared_weights.items()
              if w.stages and w.hf_names}
    files = [manifest.config]
    if (directory / GENERATION_CONFIG).is_file():
        files.append(GENERATION_CONFIG)
    files += [f for f in manifest.tokenizer_files if f not in files]
    unsaved = {s.index: frozenset(p.name for p in s.parameters if not p.persistent) for s in manifest.stages}
    plan = ExportPlan(manifest.num_stages, names, shared, files, unsaved)
    _check_plan(plan, directory)
    return plan


def _check_plan(plan: ExportPlan, directory: Path) -> None:
    seen = {}
    for stage in range(plan.num_stages):
        for name, hf in plan.expected(stage).items():
            if not isinstance(hf, str) or not hf:
                raise ExportError(f"stage {stage} parameter {name!r} has no transformers name in "
                                  f"{directory / PIPELINE}; convert again with --stages N")
            if hf in seen:
                raise ExportError(f"{hf!r} is the transformers name of both {seen[hf]} and stage {stage}'s "
                                  f"{name!r} in {directory / PIPELINE}; convert again with --stages N")
            seen[hf] = f"stage {stage}'s {name!r}"
    for name in plan.files:
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ExportError(f"{directory / PIPELINE} names the file {name!r} to copy; only plain file names "
                              f"inside the conversion directory are copied; convert again with --stages N")
        if _WEIGHTS_LIKE.search(name):
            raise ExportError(f"{directory / PIPELINE} names {name!r} as a file to copy, which would stand beside "
                              f"the exported weights; remove it from tokenizer_files")
        path = directory / name
        if not (path.exists() or path.is_symlink()):
            raise ExportError(f"{directory} has no {name}, which {PIPELINE} lists; convert again with --stages N")
        why = why_not_copyable(path, [directory.resolve()])
        if why is not None:
            raise ExportError(f"{path}, which {PIPELINE} lists to copy, is {why}; only regular files inside the "
                              f"conversion directory are copied: put the file itself there or convert again")


def export_hf(out_dir, *, pipeline_dir, states: dict[int, dict[str, torch.Tensor]], rank: int,
              barrier: Callable[[], None], manifest: "manifests.Manifest | dict | None" = None) -> Path:
    """Write `out_dir` (run/hf) as a sharded transformers checkpoint, from every rank; returns its path.

    `states` maps each stage this rank writes (its stages in dp replica 0; `{}`
    elsewhere) to that stage module's state dict. `manifest` is pipeline.json's record
    (`fxconvert.manifest.Manifest`) or parsed JSON, read from `pipeline_dir` when None.
    `barrier()` is a collective over all ranks.
    Every rank checks the plan and the destination first, so a bad manifest fails
    everywhere before anything is written.
    """
    directory = Path(pipeline_dir)
    if manifest is None:
        manifest = _read_manifest(directory)
    plan = plan_from_manifest(manifest, directory)
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp"
    check_destination(out)
    for stage in states:
        if stage not in plan.names:
            raise ExportError(f"rank {rank} passes stage {stage}, but the pipeline has stages 0..{plan.num_stages - 1}")
    try:
        if rank == 0:
            _make_tmp(tmp, out)
        barrier()  # the tmp directory exists and is empty
        for stage, state in sorted(states.items()):
            _write_shard(tmp / shard_name(stage, plan.num_stages), stage, state, plan)
        barrier()  # every shard is on disk
        if rank == 0:
            _finish(tmp, out, plan, directory)
        barrier()  # no rank goes on before run/hf is in place
    except OSError as e:
        _abandon(tmp, rank)
        raise ExportError(f"cannot write {out}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; "
                          f"free space or fix permissions, then export again") from e
    except BaseException:
        _abandon(tmp, rank)
        raise
    return out


def _make_tmp(tmp: Path, out: Path) -> None:
    """Rank 0: remove what a killed export left, then create `tmp` marked (`atomic_dir.make_named_temp`).

    A symlink at `tmp` is removed, never followed; anything else there that fxconvert did not
    write (no marker) is a user's, and the export stops rather than delete it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    # `.hf.tmp`, `.hf.tmp.<8 hex>` (being created) and `.hf.<8 hex>.old` (the replaced run/hf, being removed)
    name = re.escape(out.name)
    atomic_dir.remove_leftovers(out.parent, re.compile(rf"\.{name}\.(tmp(\.[0-9a-f]{{8}})?|[0-9a-f]{{8}}\.old)"))
    if tmp.is_symlink():
        tmp.unlink()
    if tmp.exists():
        raise ExportError(f"{tmp} is in the way and fxconvert did not write it; move it away and export again")
    atomic_dir.make_named_temp(tmp)


def _abandon(tmp: Path, rank: int) -> None:
    """Rank 0 removes an export that failed; a temporary name held by anything fxconvert did not write stays."""
    if rank == 0:
        atomic_dir.remove_if_marked(tmp)


def _read_manifest(directory: Path) -> "manifests.Manifest":
    try:
        return manifests.read(directory)
    except manifests.ManifestError as e:
        raise ExportError(str(e)) from None


MARKER = ".fxconvert-export"  # one JSON line: the files this module wrote into the directory


def check_destination(out: Path) -> None:
    """Replace only an empty directory or one this module wrote: its marker lists every file in it.

    An index file alone proves nothing (every sharded `save_pretrained` writes one), so a
    user's own checkpoint or notes in `out` are never replaced.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out} exists and is not a directory; move it away and export again")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        written = set(json.loads((out / MARKER).read_text(encoding="utf-8"))["files"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise ExportError(f"{out} exists and was not written by fxconvert (no {MARKER}); move it away or "
                          f"choose another --out") from None
    # atomic_dir.MARKER: the temporary's marker, still there when a kill came right after the rename
    foreign = sorted(p.name for p in out.iterdir() if p.name not in written | {MARKER, atomic_dir.MARKER})
    if foreign:
        raise ExportError(f"{out} holds files fxconvert did not write ({', '.join(foreign[:3])}); move them away "
                          f"or choose another --out")


def _write_shard(path: Path, stage: int, state: dict, plan: ExportPlan) -> None:
    from safetensors.torch import save_file

    expected = plan.expected(stage)
    unknown = [n for n in state if n not in plan.names[stage] and n not in plan.shared]
    missing = [n for n in expected if n not in state]
    if unknown or missing:
        problem = f"has {unknown[0]!r}, which pipeline.json does not name" if unknown else \
            f"lacks {missing[0]!r}, which pipeline.json names"
        raise ExportError(f"stage {stage}'s state dict {problem}; export the stage modules the conversion built")
    tensors = {hf: state[n].detach().to("cpu").contiguous() for n, hf in expected.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    fsync_path(path)


def _finish(tmp: Path, out: Path, plan: ExportPlan, directory: Path) -> None:
    weight_map, total = {}, 0
    for stage in range(plan.num_stages):
        shard = shard_name(stage, plan.num_stages)
        if not (tmp / shard).is_file():
            raise ExportError(f"no rank wrote {shard} (stage {stage}); pass every stage's state dict on the "
                              f"ranks of dp replica 0")
        header = _header(tmp / shard)
        names = sorted(k for k in header if k != "__metadata__")
        if names != sorted(plan.expected(stage).values()):
            raise ExportError(f"{shard} holds other tensors than stage {stage} should; export again")
        for name in names:
            start, end = header[name]["data_offsets"]
            weight_map[name] = shard
            total += end - start
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for name in plan.files:  # checked again as read: a file swapped for a symlink since the plan is refused
        try:
            data = read_copyable(directory / name, [directory.resolve()])
        except ValueError as e:
            raise ExportError(f"{directory / name} is {e}; only regular files inside the conversion directory are "
                              f"copied: put the file itself there or convert again") from None
        (tmp / name).write_bytes(data)
    written = sorted(p.name for p in tmp.iterdir() if p.name != atomic_dir.MARKER)
    (tmp / MARKER).write_text(json.dumps({"producer": "fxconvert", "files": written}) + "\n", encoding="utf-8")
    # the temporary's marker goes once it is in place: run/hf lists its files in MARKER
    atomic_dir.commit(tmp, out, replace=out.is_dir(), keep_marker=False)


def _header(path: Path) -> dict:
    """A safetensors file's JSON header (names, dtypes, shapes, offsets), read without its data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


__all__ = ["export_hf", "plan_from_manifest", "ExportPlan", "ExportError", "shard_name", "INDEX"]
