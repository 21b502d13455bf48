"""run/hf: trained stages back as a sharded transformers checkpoint that `from_pretrained` loads exactly.

Ranks are threads here, each handed only its own stages' state dicts, with a
`threading.Barrier` for the collective: the protocol is the one torch.distributed ranks
run (tests/test_checkpoint.py runs such a protocol in real gloo processes).
"""

import json
import os
import shutil
import threading

import pytest
import torch
import transformers

import helpers
from fxconvert import convert, split_stages
from fxconvert.atomic_dir import mark
from fxconvert.export import INDEX, MARKER, ExportError, export_hf, shard_name
from fxconvert.families import derived
from fxconvert.pipeline import pipeline_manifest

NAMES = ["input_ids", "attention_mask", "decoder_input_ids", "labels"]
TOKENIZER_FILES = {"spiece.model": bytes(range(256)) * 3, "tokenizer_config.json": b'{"model_max_length": 512}\n'}


def fake_manifest(stages, conversion) -> dict:
    """pipeline.json as the conversion writes it, with the names export reads set here.

    A stage's non-shared tensor `graph_module.<path>` is the eager model's `<path>`
    (the traced GraphModule keeps the module paths); a shared weight carries all its tied
    names. The tests do not trust this mapping: they compare the exported model's loss
    with the stages' own.
    """
    manifest = pipeline_manifest(stages, conversion)
    for spec, row in zip(stages.specs, manifest["stages"]):
        order = list(stages.stage_module(spec.index).state_dict())  # the stage module's order
        row["parameters"].sort(key=lambda p: order.index(p["name"]))
        for p in row["parameters"]:
            n = p["name"]
            p["hf_name"] = conversion.shared_weights[n][0] if n in spec.shared_weights else n.removeprefix("graph_module.")
    return {**manifest, "config": "config.json", "tokenizer_files": sorted(TOKENIZER_FILES)}


def write_conversion_dir(directory, model, manifest) -> None:
    """config.json and generation_config.json as save_pretrained writes them, tokenizer files, pipeline.json."""
    directory.mkdir(parents=True)
    model.save_pretrained(directory / "hf_source")
    for name in ("config.json", "generation_config.json"):
        shutil.move(directory / "hf_source" / name, directory / name)
    shutil.rmtree(directory / "hf_source")
    for name, data in TOKENIZER_FILES.items():
        (directory / name).write_bytes(data)
    (directory / "pipeline.json").write_text(json.dumps(manifest))


def run_ranks(owners: list[list[int]], modules, out, conv, **kwargs):
    """Export with one thread per rank; rank r passes only the state dicts of stages owners[r].

    A rank that fails aborts the barrier, as a dead rank makes the others' collective fail.
    Returns each rank's exception (or None).
    """
    barrier = threading.Barrier(len(owners))
    errors = [None] * len(owners)

    def rank(r):
        try:
            states = {i: modules[i].state_dict() for i in owners[r]}
            export_hf(out, pipeline_dir=conv, states=states, rank=r, barrier=barrier.wait, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors[r] = e
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(owners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture(scope="module", params=["original", "v1_1"])
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def model(variant):
    return helpers.build("T5ForConditionalGeneration", variant)


@pytest.fixture(scope="module")
def conversion(model):
    return convert(model, input_names=NAMES)


def trained_stages(conversion, num_stages, seed=0):
    """Stage modules whose weights moved away from the model's, as training moves them.

    Every copy of a shared weight moves the same way, as the launcher's gradient sum keeps
    them equal.
    """
    stages = split_stages(conversion, num_stages)
    modules = [stages.stage_module(i).eval() for i in range(num_stages)]
    g = torch.Generator().manual_seed(seed)
    shared = {n: torch.randn(p.shape, generator=g) * 0.01 for n, p in stages.named_parameters()
              if n in stages.shared_names}
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                p.add_(shared[name] if name in shared else torch.randn(p.shape, generator=g) * 0.01)
    return stages, modules


def stage_loss(stages, modules, batch):
    specs = [m.input_names for m in modules]
    values = modules[0](**{n: batch[n] for n in specs[0]})
    for module, names in zip(modules[1:], specs[1:]):
        received = len(values)
        values = module(*values, **{n: batch[n] for n in names[received:]})
    return values


@pytest.mark.parametrize("num_stages, owners", [(2, [[0], [1]]), (3, [[0], [1], [2]]), (3, [[0, 2], [1]]),
                                                (2, [[0, 1]]), (2, [[0], [1], []])])
def test_export_loads_exactly_in_transformers(tmp_path, variant, model, conversion, num_stages, owners):
    stages, modules = trained_stages(conversion, num_stages)
    manifest = fake_manifest(stages, conversion)
    conv, out = tmp_path / "conv", tmp_path / "run" / "hf"
    write_conversion_dir(conv, model, manifest)
    assert run_ranks(owners, modules, out, conv) == [None] * len(owners)

    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["hf"]
    shards = [shard_name(i, num_stages) for i in range(num_stages)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", INDEX, *shards, *TOKENIZER_FILES, MARKER])
    assert json.loads((out / MARKER).read_text())["files"] == sorted(
        ["config.json", "generation_config.json", INDEX, *shards, *TOKENIZER_FILES])
    for name in ["config.json", "generation_config.json", *TOKENIZER_FILES]:
        assert (out / name).read_bytes() == (conv / name).read_bytes(), name

    loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    loaded.eval()

    # exactly the trained tensors, each under the name the manifest gives it
    expected = {}
    for row, module in zip(manifest["stages"], modules):
        state = module.state_dict()
        for p in row["parameters"]:
            expected.setdefault(p["hf_name"], state[p["name"]])
    got = loaded.state_dict()
    assert set(expected) <= set(got)
    assert [n for n in expected if not torch.equal(got[n], expected[n])] == []
    # the tied names are tied again, to the trained shared weight
    shared = "shared_embed_weight"
    for hf in conversion.shared_weights[shared]:
        assert loaded.get_parameter(hf) is loaded.shared.weight, hf
    assert torch.equal(loaded.shared.weight, modules[0].get_parameter(shared))
    head_tied = "lm_head.weight" in conversion.shared_weights[shared]
    assert head_tied == (variant == "original")
    if not head_tied:
        assert not torch.equal(loaded.lm_head.weight, loaded.shared.weight)
    # independent of the naming: transformers computes the loss the trained stages compute
    batch = helpers.random_inputs(NAMES, 2, 7, 5, seed=3)
    with torch.no_grad():
        ours = stage_loss(stages, modules, batch)
        theirs = loaded(**batch, use_cache=False).loss
        untrained = model(**batch, use_cache=False).loss
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert abs(untrained - ours) > 1e-4  # the comparison can tell trained from untrained weights

    generated = loaded.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                                do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] >= 2

    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"]) == set(got) - {hf for hf in conversion.shared_weights[shared][1:]}
    assert index["metadata"]["total_size"] == sum(got[n].numel() * got[n].element_size() for n in index["weight_map"])


@pytest.fixture(scope="module")
def tied():
    """The tied model and its conversion, for the failure cases (they do not depend on the variant)."""
    model = helpers.build("T5ForConditionalGeneration", "original")
    return model, convert(model, input_names=NAMES)


@pytest.fixture
def setup(tmp_path, tied):
    model, conversion = tied
    stages, modules = trained_stages(conversion, 2)
    manifest = fake_manifest(stages, conversion)
    conv = tmp_path / "conv"
    write_conversion_dir(conv, model, manifest)
    return modules, manifest, conv, tmp_path / "run" / "hf"


class Holder:
    """Stands for a stage module whose state dict a test edits."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def _one_line(errors):
    error = next(e for e in errors if isinstance(e, ExportError))
    assert "\n" not in str(error)
    return str(error)


def test_a_failing_rank_leaves_no_output(setup):
    modules, _, conv, out = setup
    state = modules[1].state_dict()
    name = next(n for n in state if n.startswith("graph_module."))
    broken = Holder({k: v for k, v in state.items() if k != name})
    errors = run_ranks([[0], [1]], [modules[0], broken], out, conv)
    assert f"lacks {name!r}" in _one_line(errors)
    assert isinstance(errors[0], threading.BrokenBarrierError)
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_an_unknown_tensor_is_refused(setup):
    modules, _, conv, out = setup
    fake = Holder(dict(modules[0].state_dict(), extra=torch.zeros(1)))
    errors = run_ranks([[0, 1]], [fake, modules[1]], out, conv)
    assert "has 'extra', which pipeline.json does not name" in _one_line(errors)
    assert not out.exists()


def test_a_stage_nobody_writes_is_caught(setup):
    modules, _, conv, out = setup
    errors = run_ranks([[0], []], modules, out, conv)
    assert "no rank wrote model-00002-of-00002.safetensors (stage 1)" in _one_line(errors)
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_export_replaces_its_own_previous_output(setup):
    modules, _, conv, out = setup
    assert run_ranks([[0, 1]], modules, out, conv) == [None]
    previous = json.loads((out / MARKER).read_text())["files"]
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(1.0)
    assert run_ranks([[0, 1]], modules, out, conv) == [None]
    assert json.loads((out / MARKER).read_text())["files"] == previous  # the new export, in place of its own
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(out)
    assert torch.equal(loaded.shared.weight, modules[0].get_parameter("shared_embed_weight"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]


def test_export_refuses_to_replace_what_it_did_not_write(setup):
    modules, _, conv, out = setup
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("a user's file")
    errors = run_ranks([[0], [1]], modules, out, conv)
    assert "was not written by fxconvert" in _one_line(errors)
    assert all(isinstance(e, ExportError) for e in errors)  # every rank refuses before any barrier
    assert (out / "mine.txt").read_text() == "a user's file"
    (out / "mine.txt").unlink()
    out.rmdir()
    out.write_text("a file")
    assert "is not a directory" in _one_line(run_ranks([[0, 1]], modules, out, conv))


def test_a_stale_temporary_symlink_is_removed_not_followed(setup, tmp_path):
    modules, _, conv, out = setup
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    out.parent.mkdir(parents=True)
    (out.parent / ".hf.tmp").symlink_to(precious)
    assert run_ranks([[0, 1]], modules, out, conv) == [None]
    assert (precious / "keep.txt").read_text() == "keep" and sorted(os.listdir(precious)) == ["keep.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]


@pytest.mark.parametrize("name, message", [
    ("../secret.json", "only plain file names"),
    ("/etc/passwd", "only plain file names"),
    ("..", "only plain file names"),
    ("model.safetensors", "would stand beside the exported weights"),
    ("pytorch_model.bin", "would stand beside the exported weights"),
    ("model.safetensors.index.json", "would stand beside the exported weights"),
    ("absent.json", "has no absent.json"),
])
def test_hostile_file_names_in_the_manifest(setup, tmp_path, name, message):
    modules, manifest, conv, out = setup
    (tmp_path / "secret.json").write_text("secret")
    manifest = dict(manifest, tokenizer_files=[name])
    errors = run_ranks([[0, 1]], modules, out, conv, manifest=manifest)
    assert message in _one_line(errors)
    assert not out.parent.exists()


def test_duplicate_transformers_names_are_refused(setup):
    modules, manifest, conv, out = setup
    manifest = json.loads(json.dumps(manifest))
    params = manifest["stages"][1]["parameters"]
    params[-1]["hf_name"] = params[-2]["hf_name"]
    errors = run_ranks([[0, 1]], modules, out, conv, manifest=manifest)
    assert "is the transformers name of both" in _one_line(errors)


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "pipeline.json").unlink(), "has no pipeline.json; convert with --stages N"),
    (lambda d: (d / "pipeline.json").write_text("{oops"), "cannot read"),
    (lambda d: (d / "pipeline.json").write_text("[]"), "does not hold a JSON object"),
    (lambda d: (d / "pipeline.json").write_text('{"num_stages": 2}'), "is malformed (KeyError"),
    (lambda d: (d / "pipeline.json").write_text('{"num_stages": 3, "stages": []}'), "lists stages [] for num_stages 3"),
    (lambda d: (d / "config.json").unlink(), "has no config.json"),
])
def test_a_broken_conversion_directory(setup, edit, message):
    modules, _, conv, out = setup
    edit(conv)
    errors = run_ranks([[0, 1]], modules, out, conv)
    assert message in _one_line(errors)
    assert not out.parent.exists()


@pytest.mark.parametrize("variant_name", ["original", "v1_1"])
def test_export_of_a_real_pipeline_conversion(tmp_path, capsys, variant_name):
    """End to end with what `fxconvert CKPT --stages 2` writes: pipeline.json, stage files, config, tokenizer."""
    pipeline = pytest.importorskip("fxconvert.pipeline", reason="this tree has no fxconvert.pipeline "
                                   "(pipeline.json and stage files from --stages) yet")
    from checkpoints import write_checkpoint
    from fxconvert.cli import main

    checkpoint, conv, out = tmp_path / "ck", tmp_path / "conv", tmp_path / "run" / "hf"
    model = write_checkpoint(checkpoint, variant=variant_name)
    (checkpoint / "spiece.model").write_bytes(TOKENIZER_FILES["spiece.model"])
    assert main([str(checkpoint), "--stages", "2", "--out", str(conv)]) == 0
    capsys.readouterr()
    loaded_pipeline = pipeline.load_pipeline(conv)
    modules = [loaded_pipeline.load_stage(i) for i in range(2)]
    g = torch.Generator().manual_seed(0)
    moved = {}
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if name not in loaded_pipeline.shared_weights or name not in moved:
                    moved[name] = torch.randn(p.shape, generator=g) * 0.01
                p.add_(moved[name])

    assert run_ranks([[0], [1]], modules, out, conv) == [None, None]
    loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    assert (out / "spiece.model").read_bytes() == TOKENIZER_FILES["spiece.model"]
    assert (out / "config.json").read_bytes() == (conv / "config.json").read_bytes()
    batch = helpers.random_inputs(NAMES, 2, 7, 5, seed=3)
    with torch.no_grad():
        values = modules[0](*[batch[n] for n in loaded_pipeline.stages[0].inputs])
        ours = modules[1](*values, **{n: batch[n] for n in loaded_pipeline.stages[1].inputs})
        theirs = loaded.eval()(**batch, use_cache=False).loss
        untrained = model(**batch, use_cache=False).loss
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert abs(untrained - ours) > 1e-4


SAVED_BY_TRANSFORMERS = {
    "roberta": lambda: transformers.RobertaForSequenceClassification(derived.tiny_config("roberta", num_labels=3)),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=97,
        max_position_embeddings=64)),
}


@pytest.mark.parametrize("name", sorted(SAVED_BY_TRANSFORMERS))
def test_the_export_names_what_save_pretrained_names(tmp_path, capsys, name):
    """A stage reads the eager model's non-persistent buffers (RoBERTa's token_type_ids, BERT's position_ids), but
    save_pretrained leaves them out and from_pretrained reports them as unexpected: the export writes exactly
    the tensors transformers' own save_pretrained writes, and loads with nothing missing or unexpected."""
    from safetensors import safe_open

    from fxconvert.cli import main
    from fxconvert.pipeline import load_pipeline

    torch.manual_seed(0)
    model = SAVED_BY_TRANSFORMERS[name]()
    checkpoint, conv, out = tmp_path / "ck", tmp_path / "conv", tmp_path / "run" / "hf"
    model.save_pretrained(checkpoint)
    assert main([str(checkpoint), "--stages", "2", "--out", str(conv), "-q"]) == 0
    capsys.readouterr()
    loaded_pipeline = load_pipeline(conv)
    modules = [loaded_pipeline.load_stage(i) for i in range(2)]
    assert run_ranks([[0, 1]], modules, out, conv) == [None]
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert set(json.loads((out / INDEX).read_text())["weight_map"]) == saved
    _, info = type(model).from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info


def test_an_unwritable_destination_is_one_line(setup, tmp_path):
    modules, _, conv, _ = setup
    (tmp_path / "run").write_text("a file where the run directory should be")
    errors = run_ranks([[0, 1]], modules, tmp_path / "run" / "hf", conv)
    assert "cannot write" in _one_line(errors) and "fix permissions" in _one_line(errors)
    assert (tmp_path / "run").read_text() == "a file where the run directory should be"


def test_a_users_sharded_checkpoint_is_never_replaced(setup, tmp_path):
    """An index file proves nothing (every sharded save_pretrained writes one): only the marker does."""
    modules, _, conv, out = setup
    users = tmp_path / "users-hf"
    helpers.build().save_pretrained(users, max_shard_size="20KB")
    assert (users / "model.safetensors.index.json").is_file()
    before = sorted(p.name for p in users.iterdir())
    errors = run_ranks([[0], [1]], modules, users, conv)
    assert "was not written by fxconvert" in _one_line(errors)
    assert sorted(p.name for p in users.iterdir()) == before
    # fxconvert's own export is replaced; with a foreign file added it is refused
    run_ranks([[0, 1]], modules, out, conv)
    run_ranks([[0, 1]], modules, out, conv)
    (out / "notes.md").write_text("mine")
    assert "holds files fxconvert did not write (notes.md)" in _one_line(run_ranks([[0, 1]], modules, out, conv))
    assert (out / "notes.md").read_text() == "mine"


@pytest.mark.parametrize("make", ["outside", "fifo", "directory"])
def test_a_listed_file_that_is_not_a_regular_file_inside_is_refused(setup, tmp_path, make):
    """A conversion whose tokenizer file is a symlink to a secret (or a FIFO, a directory): never copied."""
    modules, _, conv, out = setup
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    (conv / "spiece.model").unlink()
    if make == "outside":
        (conv / "spiece.model").symlink_to(secret)
    elif make == "fifo":
        os.mkfifo(conv / "spiece.model")
    else:
        (conv / "spiece.model").mkdir()
    errors = run_ranks([[0], [1]], modules, out, conv)
    message = _one_line(errors)
    assert "spiece.model" in message and "only regular files inside the conversion directory" in message
    assert {"outside": "symlink to a file outside", "fifo": "not a regular file",
            "directory": "not a regular file"}[make] in message
    assert all(isinstance(e, ExportError) for e in errors)  # every rank refuses before writing anything
    assert not out.parent.exists()


def test_a_symlink_inside_the_conversion_is_copied(setup):
    modules, _, conv, out = setup
    (conv / "tokenizers").mkdir()
    (conv / "spiece.model").rename(conv / "tokenizers" / "spiece.model")
    (conv / "spiece.model").symlink_to(conv / "tokenizers" / "spiece.model")
    assert run_ranks([[0], [1]], modules, out, conv) == [None, None]
    assert (out / "spiece.model").read_bytes() == TOKENIZER_FILES["spiece.model"]
    assert not (out / "spiece.model").is_symlink()


def test_a_users_directory_with_the_temporary_name_is_left_alone(setup):
    """`.hf.tmp` without fxconvert's marker is not what a killed export left: it stays, and the export says so."""
    modules, _, conv, out = setup
    users = out.parent / ".hf.tmp"
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    errors = run_ranks([[0], [1]], modules, out, conv)
    assert ".hf.tmp is in the way and fxconvert did not write it; move it away" in _one_line(errors)
    assert (users / "notes.txt").read_text() == "mine" and not out.exists()


def test_the_next_export_removes_what_a_killed_export_left(setup, monkeypatch):
    """A rank killed mid-export leaves its marked temporary (no cleanup runs); the next export removes it, and
    only the marked directories with the export's names."""
    import fxconvert.export as export_module

    modules, _, conv, out = setup
    broken = Holder({})
    with monkeypatch.context() as m:
        m.setattr(export_module, "_abandon", lambda tmp, rank: None)  # killed: nothing cleans up
        assert run_ranks([[0], [1]], [modules[0], broken], out, conv)[1] is not None
    assert sorted(p.name for p in out.parent.iterdir()) == [".hf.tmp"]
    for name in (".hf.tmp.0123abcd", ".hf.0123abcd.old"):  # a kill while creating it, or while replacing
        (out.parent / name).mkdir()
        mark(out.parent / name)
    (out.parent / ".hf.tmp.89abcdef").mkdir()  # a user's, with a name of that shape: no marker
    assert run_ranks([[0, 1]], modules, out, conv) == [None]
    assert sorted(p.name for p in out.parent.iterdir()) == [".hf.tmp.89abcdef", "hf"]
