"""Family knowledge stays in the family records: code outside `fxconvert/families/` reads a model's
sizes through the records' readers (`Family.input_sizes`, `Family.vocab`), never a config attribute
by its family's name (T5's `d_model` is GPT-2's `n_embd` and BERT's `hidden_size`)."""

import ast
from pathlib import Path

import pytest
import transformers

from fxconvert import families

PACKAGE = Path(__file__).resolve().parents[1] / "fxconvert"

# Config attributes whose name differs by family, or that only some families have.
FAMILY_CONFIG_ATTRIBUTES = {
    "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers",  # T5, BART
    "n_embd", "n_head", "n_layer", "n_positions", "n_inner",  # GPT-2
    "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
    "decoder_ffn_dim", "vocab_size", "type_vocab_size", "max_position_embeddings", "tie_word_embeddings",
}
# Modules allowed to read them by name: none (an entry needs a reason a reader cannot serve).
ALLOWED = set()


def family_attribute_reads(path: Path) -> list[str]:
    """`line: name` for every attribute access `x.NAME` and every string literal equal to NAME."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in FAMILY_CONFIG_ATTRIBUTES:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in FAMILY_CONFIG_ATTRIBUTES:
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def outside_families():
    return sorted(p for p in PACKAGE.rglob("*.py") if "families" not in p.relative_to(PACKAGE).parts)


def test_no_module_outside_the_records_reads_a_family_config_attribute():
    leaks = {str(p.relative_to(PACKAGE)): reads for p in outside_families()
             if p.name not in ALLOWED and (reads := family_attribute_reads(p))}
    assert not leaks, f"read them through the family record's readers (fxconvert.families.Family): {leaks}"


def test_the_allowlist_names_only_modules_that_still_need_it():
    """An entry whose module no longer reads such an attribute (or is gone) is removed from ALLOWED."""
    needed = {p.name for p in outside_families() if p.name in ALLOWED and family_attribute_reads(p)}
    assert needed == ALLOWED


def test_the_check_finds_what_it_looks_for(tmp_path):
    source = tmp_path / "leak.py"
    source.write_text("def f(config, family):\n    return config.d_model, getattr(config, 'n_embd'), "
                      "family.input_sizes(config)\n")
    assert family_attribute_reads(source) == ["2: .d_model", "2: 'n_embd'"]


TINY = {
    "t5": transformers.T5Config(vocab_size=37, d_model=8, d_ff=16, d_kv=4, num_heads=2, num_layers=1),
    "bart": transformers.BartConfig(vocab_size=37, d_model=8, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                    decoder_ffn_dim=16),
    "gpt2": transformers.GPT2Config(vocab_size=37, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0),
    "llama": transformers.LlamaConfig(vocab_size=37, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1),
    "bert": transformers.BertConfig(vocab_size=37, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, type_vocab_size=3),
}


@pytest.mark.parametrize("family", families.all_families(), ids=lambda f: f.name)
def test_the_readers_give_the_sizes_transformers_builds_with(family):
    """The hidden size is the width of the input embedding transformers builds, the vocabulary its rows,
    for a config object and for its config.json dict alike."""
    config = TINY[family.name]
    model = transformers.AutoModel.from_config(config)
    embedding = model.get_input_embeddings().weight
    for form in (config, config.to_dict()):
        sizes = family.input_sizes(form)
        assert (sizes["hidden"], sizes["vocab"]) == (embedding.shape[1], embedding.shape[0])
        assert family.vocab(form) == embedding.shape[0]
        assert sizes["type_vocab"] == (3 if family.name == "bert" else 2)
        assert sizes["classes"] == config.num_labels  # what a classification head is built with
    assert family.input_sizes(None) == {"hidden": None, "vocab": 2, "type_vocab": 2, "classes": 2}
    assert family.vocab({}) is None
