"""What a conversion did, as plain data rendered for terminals (rich), files (markdown), logs and CI.

A `Report` is a title, warnings and a list of `Section`s. Each section carries JSON-ready
`data` (for report.json) and a display form: `fields` (key: value lines), `tables`,
an optional `code` block and `notes`. Builders turn a `Conversion` into sections; the
renderers know nothing about conversions:

- `print_rich(report, console)`: the terminal (rich tables, a highlighted diff);
- `render(report, "markdown" | "plain" | "json")`: text (tabulate for the tables).

A feature adds a section by writing one builder and appending its result to
`Report.sections` (see `build_report(..., extra=[...])`).
"""

import dataclasses
import difflib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from fxconvert.analysis import node_kind
from fxconvert.cost import flops_text
from fxconvert.errors import UsageError, printable
from fxconvert.graph_info import graph_info
from fxconvert import families
from fxconvert.trace import _EXAMPLE_SIZES

FORMATS = ("rich", "plain", "markdown", "json")
PHASES = ("load", "trace", "passes", "validate", "write")


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]  # cells: str or number; a list of str is one item per line
    title: str = ""


@dataclass
class Section:
    key: str  # its key in report.json
    title: str
    data: Any = None  # JSON-ready
    fields: dict[str, str] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    code: str | None = None
    language: str = "diff"
    notes: list[str] = field(default_factory=list)
    bars: list[tuple[str, float, str]] = field(default_factory=list)  # (label, share 0..1, caption), terminal only


@dataclass
class Report:
    title: str
    status: str  # "ok", "validation failed", ...
    warnings: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def section(self, key: str) -> Section:
        return next(s for s in self.sections if s.key == key)

    def render(self, fmt: str) -> str:
        """The report as text in `fmt`: "plain", "markdown" or "json" (see `render`)."""
        return render(self, fmt)

    def print_rich(self, console) -> None:
        """The report on a rich console (see `print_rich`)."""
        print_rich(self, console)

    def to_dict(self) -> dict:
        out = {"title": self.title, "status": self.status, "warnings": self.warnings}
        out.update({s.key: s.data for s in self.sections})
        return out


# -- builders ----------------------------------------------------------------------------------


def build_report(conversion, *, validation=None, extra=(), detail: bool = True) -> Report:
    """The standard report of a conversion; `detail` adds every validated tensor to the display."""
    source = conversion.source
    warnings = list(source.notes) if source is not None else []
    status = "ok"
    sections = [model_section(conversion), io_section(conversion), passes_section(conversion),
                shared_weights_section(conversion)]
    if validation is not None:
        sections.append(validation_section(validation, detail=detail))
        if validation.skipped is None and not validation.passed:
            status = "validation failed"
            warnings.append(f"VALIDATION FAILED: {len(validation.failures)} tensor(s) are not finite or exceed "
                            f"the tolerance ({validation.tolerance})")
    sections.append(timings_section(conversion.timings))
    sections.extend(extra)
    return Report(f"fxconvert: {conversion.model_class} ({_name(conversion)})", status, warnings, sections)


def model_section(conversion) -> Section:
    model = conversion.model if conversion.model is not None else conversion.module
    params = {id(p): p for p in model.parameters()}
    n_params = sum(p.numel() for p in params.values())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params.values()})
    config = getattr(model, "config", None)
    family = families.family_of_class(conversion.model_class)
    summary = _config_summary(config, family) if config is not None else {}
    source = conversion.source
    origin = f"{source.origin} {source.location}" if source is not None else "a model object"
    data = {
        "class": conversion.model_class,
        "family": family.name if family is not None else None,
        "record": _record(family),
        "source": asdict(source) if source is not None else None,
        "parameters": n_params,
        "dtype": ", ".join(dtypes),
        "attention": getattr(config, "_attn_implementation", None),
        "config": summary,
        "leaves": [_leaf(name, where) for name, where in getattr(conversion, "leaves", {}).items()],
    }
    fields = {
        "class": conversion.model_class,
        "family": f"{family.title}: {family.notes}" if family is not None else "",
        "record": data["record"] or "",
        "source": origin,
        "weights": source.weights if source is not None else "from the model object",
        "device": source.device if source is not None else str(next(iter(params.values())).device),
        "parameters": f"{_short_count(n_params)} ({n_params:,})",
        "dtype": data["dtype"],
        "attention": str(data["attention"]),
        "config": ", ".join(f"{k} {v}" for k, v in summary.items()),
    }
    if data["leaves"]:  # modules run as eager code (`fxconvert.trace`)
        fields["leaves"] = "; ".join(f"{leaf['module'] if 'module' in leaf else leaf['function'] + '()'} "
                                     f"({leaf['source']})" for leaf in data["leaves"])
    return Section("model", "Model", data, fields)


def _leaf(name: str, where: str) -> dict:
    """A leaf's report entry: a module path, or a model function's qualified name (`name()`, see
    `fxconvert.trace`), with the source line that made it a leaf."""
    if name.endswith("()"):
        return {"function": name[:-2], "source": where}
    return {"module": name, "source": where}


def _record(family) -> str | None:
    """Which family record the conversion used: a hand-written one, or one derived from the class."""
    if family is None:
        return None
    return f"derived from {family.derived_from}'s declarations" if family.derived_from else "hand-written"


def io_section(conversion) -> Section:
    gm = conversion.graph_module
    shared = set(conversion.shared_weights) | set(graph_info(gm).lifted_weights or {})
    rows, data = [], []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.target
        if name in conversion.input_names:
            role, shape, dtype = "model input", _input_shape(name, conversion.model_class), _dtype(node)
        elif name in shared:
            role, shape, dtype = "shared weight", str(tuple(node.meta["val"].shape)), _dtype(node)
        else:
            default = node.args[0] if node.args else None
            role, shape, dtype = f"flag (default {default})", "", "bool"
        rows.append([name, role, dtype, shape])
        data.append({"name": name, "role": role, "dtype": dtype, "shape": shape})
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    val = value.meta.get("val") if hasattr(value, "meta") else None
    out_dtype = str(val.dtype).removeprefix("torch.") if hasattr(val, "dtype") else ""
    out_shape = _output_shape(val, conversion.model_class)
    tables = [Table(["input", "role", "dtype", "shape"], rows, "Inputs (placeholders, in order)"),
              Table(["output", "dtype", "shape"], [[conversion.output_name, out_dtype, out_shape]], "Output")]
    dropped = list(getattr(conversion, "dropped_inputs", ()))
    notes = [f"dropped inputs: {', '.join(dropped)} (the output {conversion.output_name} does not read them)"
             ] if dropped else []
    return Section("io", "Inputs and output", {"inputs": data, "output": {"name": conversion.output_name,
                                                                        "dtype": out_dtype, "shape": out_shape},
                                               "dropped_inputs": dropped},
                   tables=tables, notes=notes)


def passes_section(conversion) -> Section:
    rows = []
    for p in conversion.passes:
        new_inputs = [n for n in p.placeholders_after if n not in p.placeholders_before]
        gone_inputs = [n for n in p.placeholders_before if n not in p.placeholders_after]
        gone_outputs = [n for n in p.outputs_before if n not in p.outputs_after]
        added = [f"+{n} {k}" + (f" ({', '.join(new_inputs)})" if k == "placeholder" else "")
                 for k, n in p.added.items()]
        removed = [f"-{n} {k}" + (f" ({', '.join(gone_inputs)})" if k == "placeholder" else "")
                   for k, n in p.removed.items()]
        if gone_outputs:
            removed.append(f"-{len(gone_outputs)} output(s) ({', '.join(gone_outputs)})")
        rows.append([p.name, "yes" if p.modified else "no", f"{p.nodes_before} -> {p.nodes_after}",
                     added or "", removed or "", _seconds(p.seconds)])
    return Section("passes", "Passes", [asdict(p) for p in conversion.passes],
                   tables=[Table(["pass", "modified", "nodes", "added", "removed", "time"], rows)])


def shared_weights_section(conversion) -> Section:
    gm = conversion.graph_module
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    weights, consumers, data = [], [], []
    for name, eager_names in conversion.shared_weights.items():
        node = placeholders.get(name)
        val = node.meta.get("val") if node is not None else None
        shape = str(tuple(val.shape)) if val is not None else ""
        users = []
        for user in (node.users if node is not None else ()):
            users.append({"node": user.name, "kind": node_kind(user, gm), "module": user.meta.get("module_path", ""),
                          "source": user.meta.get("source", "")})
            consumers.append([name, user.name, node_kind(user, gm), user.meta.get("module_path", ""),
                              user.meta.get("source", "")])
        weights.append([name, shape, _dtype(node) if node is not None else "", list(eager_names)])
        data.append({"name": name, "shape": shape, "tied_names": list(eager_names), "consumers": users})
    tables = [Table(["weight", "shape", "dtype", "eager names"], weights),
              Table(["weight", "node", "kind", "module", "source"], consumers, "Nodes that consume them")]
    notes = [] if weights else ["no parameter is shared: the graph takes no weight as input"]
    return Section("shared_weights", "Shared weights", data, tables=tables if weights else [], notes=notes)


def validation_section(result, *, detail: bool = True) -> Section:
    data = asdict(result) | {"passed": result.passed}
    if result.skipped is not None:
        return Section("validation", "Validation", data, {"status": f"skipped: {result.skipped}"})
    runs: dict[str, list] = {}
    for c in result.checks:
        runs.setdefault(c.run, []).append(c)
    summary = []
    for run, checks in runs.items():
        outputs = [c for c in checks if c.tensor.startswith("output")]
        grads = [c for c in checks if c.tensor.startswith("grad") and c.max_diff is not None]
        worst = max(grads, key=lambda c: c.max_diff, default=None)
        summary.append([
            run,
            ", ".join(_diff(c.max_diff) for c in outputs),
            "" if worst is None else _diff(worst.max_diff) if worst.max_diff == 0 else
            f"{_diff(worst.max_diff)} ({worst.tensor.removeprefix('grad ')})",
            len(checks),
            "ok" if all(c.ok for c in checks) else "FAILED",
        ])
    fields = {
        "status": "passed" if result.passed else "FAILED",
        "tolerance": result.tolerance,
        "rule": result.rule,
        "seed": str(result.seed),
        "checked": f"{len(result.checks)} tensors, max diff {_diff(result.max_diff)}",
    }
    tables = [Table(["run", "output max diff", "grad max diff (worst parameter)", "tensors", "result"], summary)]
    if result.failures:
        tables.append(Table(["run", "tensor", "max diff", "why"],
                            [[c.run, c.tensor, _diff(c.max_diff), c.note or "exceeds the tolerance"]
                             for c in result.failures], "Failures"))
    if detail:
        names = list(dict.fromkeys(c.tensor for c in result.checks))
        by_key = {(c.tensor, c.run): c for c in result.checks}
        rows = [[n] + [_check_cell(by_key.get((n, run))) for run in runs] for n in names]
        tables.append(Table(["tensor", *runs], rows, "Max abs diff per tensor"))
    return Section("validation", "Validation", data, fields, tables)


def timings_section(timings: dict[str, float]) -> Section:
    order = [p for p in PHASES if p in timings] + [p for p in timings if p not in PHASES]
    rows = [[p, _seconds(timings[p])] for p in order] + [["total", _seconds(sum(timings.values()))]]
    return Section("timings", "Timings", {p: timings[p] for p in order}, tables=[Table(["phase", "time"], rows)])


def diff_section(conversion) -> Section:
    if conversion.traced_code is None:
        raise UsageError("this conversion kept no traced code to diff; convert with keep_traced_code=True")
    before = conversion.traced_code.strip().splitlines()
    after = conversion.graph_module.code.strip().splitlines()
    diff = "\n".join(difflib.unified_diff(before, after, "traced", "converted", lineterm=""))
    plus = sum(1 for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
    minus = sum(1 for line in diff.splitlines() if line.startswith("-") and not line.startswith("---"))
    return Section("diff", "Code diff (traced -> converted)", diff, code=diff or "(no change)",
                   notes=[f"{plus} lines added, {minus} removed"])


def stages_section(rows: list[dict]) -> Section:
    """The pipeline stages (`fxconvert.stages.stage_table` rows): one table row per stage."""
    table = []
    for r in rows:
        blocks = r["blocks"]
        span = f"{blocks[0]} .. {blocks[-1]}" if len(blocks) > 2 else ", ".join(blocks)
        sent = [f"{v['name']} {tuple(v['shape']) if v['shape'] is not None else ''} {_bytes(v['bytes'])}".strip()
                for v in r["sent"]] or ["(the output)"]
        table.append([r["stage"], span, f"{r['parameters']:,}", _bytes(r["parameter_bytes"]),
                      "yes" if r["receives_shared_weight"] else "no", sent, _bytes(r["sent_bytes"])])
    return Section(
        "stages", f"Pipeline stages ({len(rows)})", rows,
        tables=[Table(["stage", "blocks", "parameters", "bytes", "shared weight", "sends (traced shape)",
                       "sent bytes"], table)],
        notes=["sizes are at the traced example shape (batch 2, encoder 7, decoder 5 tokens)",
               "the shared weight is not counted in a stage's parameters: each stage that uses it holds a copy"],
    )


def stage_plan_section(rows: list[dict], plan: dict) -> Section:
    """Predicted cost of each stage (`stage_table` rows and `stage_plan`), with a bar of its time share."""
    measured = plan["balance"] == "profile"
    table = []
    for r in rows:
        table.append([r["stage"], f"{flops_text(r['flops'])} ({r['flops_share']:.0%})",
                      f"{_seconds(r['seconds'])} ({r['time_share']:.0%})", _bytes(r["activation_bytes"]),
                      _bytes(r["peak_bytes"]), r["in_flight"],
                      _bytes(r["sent_bytes_per_microbatch"]), "yes" if r["bottleneck"] else ""])
    fields = {
        "balanced by": {"time": "predicted time (FLOPs and bytes moved)", "params": "parameter bytes",
                        "profile": "measured time on this machine"}[plan["balance"]],
        "sizes": ", ".join([f"batch {plan['batch']} per microbatch"] + [
            f"{key.removesuffix('_length')} {value}" for key, value in plan.items() if key.endswith("_length")])
                 + " tokens",
        "schedule": f"{plan['schedule']}, {plan['microbatches']} microbatches",
        "bottleneck": f"stage {plan['bottleneck']}",
        "bubble": f"{plan['bubble_fraction']:.0%} of the stages' time idle "
                  f"(one step {_seconds(plan['step_seconds'])})",
    }
    return Section(
        "stage_plan", "Stage costs (predicted)" if not measured else "Stage costs (time measured)", plan,
        fields=fields,
        tables=[Table(["stage", "fwd+bwd FLOPs", "fwd+bwd time" + (" (measured)" if measured else ""),
                       "activations", "peak memory", "in flight", "sends", "bottleneck"], table)],
        bars=[(f"stage {r['stage']}", r["time_share"], f"{r['time_share']:.0%}") for r in rows],
        notes=["per microbatch; peak memory = parameters, gradients and optimizer state (a shared weight on every "
               "stage holding a copy) + activations of the microbatches in flight + backward's working set and the "
               "receive buffers (see the memory plan)"],
    )


def memory_plan_section(rows: list[dict], plan: dict) -> Section:
    """What each stage is predicted to hold at its peak (`stage_table` rows and `stage_plan`), against the target."""
    target = plan["max_memory"]
    table, data = [], []
    for r in rows:
        peak = _bytes(r["peak_bytes"]) + (f" ({r['peak_bytes'] / target:.0%})" if target else "")
        saved = f"{_bytes(r['activation_bytes'])} x {r['in_flight']}"
        table.append([r["stage"], _bytes(r["stage_parameter_bytes"]), _bytes(r["gradient_bytes"]),
                      _bytes(r["optimizer_bytes"]), saved, _bytes(r["recomputed_bytes"]), peak,
                      _seconds(r["seconds"]), blocks_text(r["recompute"]) or "-"])
        data.append({key: r[key] for key in ("stage", "gradient_bytes", "optimizer_bytes", "activation_bytes",
                                             "in_flight", "recomputed_bytes", "peak_bytes", "seconds", "recompute")}
                    | {"parameter_bytes": r["stage_parameter_bytes"]})
    largest = max(r["peak_bytes"] for r in rows)
    fields = {
        "optimizer": plan["optimizer"],
        "memory target": (f"{_bytes(target)} per stage; the largest peak is {largest / target:.0%} of it"
                          if target else "none given"),
        "recompute": (f"{len(plan['recompute'])} of {sum(len(r['blocks']) for r in rows)} blocks"
                      if plan["recompute"] else "none"),
        "step": f"{_seconds(plan['step_seconds'])} predicted, {plan['bubble_fraction']:.0%} bubble "
                f"({plan['schedule']}, {plan['microbatches']} microbatches)",
    }
    return Section(
        "memory_plan", "Memory plan (predicted)", {"optimizer": plan["optimizer"], "max_memory": target,
                                                   "recompute": plan["recompute"], "stages": data},
        fields=fields,
        tables=[Table(["stage", "parameters", "gradients", "optimizer state", "saved x in flight", "recomputed",
                       "peak", "fwd+bwd time", "blocks recomputed"], table)],
        notes=["peak = parameters + gradients + optimizer state + activations saved per microbatch x microbatches "
               "in flight + the largest recomputed block's activations (rebuilt in backward, one block at a time) "
               "+ backward's working set and the receive buffers, at the larger of a step's first backward (not "
               "every gradient allocated yet) and a later one; a recomputed block saves only its inputs, and its "
               "forward runs again (in the time)"],
    )


def blocks_text(names) -> str:
    """Block names with runs of consecutive indices joined: encoder.block.0-5, decoder.block.2."""
    runs = []  # [prefix, first, last]
    for name in names:
        prefix, _, index = name.rpartition(".")
        if index.isdigit() and runs and runs[-1][0] == prefix and runs[-1][2] == int(index) - 1:
            runs[-1][2] = int(index)
        elif index.isdigit():
            runs.append([prefix, int(index), int(index)])
        else:
            runs.append([name, None, None])
    return ", ".join(p if a is None else f"{p}.{a}" + (f"-{b}" if b != a else "") for p, a, b in runs)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# -- renderers ---------------------------------------------------------------------------------


def render(report: Report, fmt: str) -> str:
    """The report as text: "markdown" (GitHub tables), "plain" or "json"."""
    if fmt == "json":  # json.dumps escapes control characters itself
        return json.dumps(report.to_dict(), indent=2, default=str) + "\n"
    report = _printable(report)
    if fmt == "markdown":
        return _markdown(report)
    if fmt == "plain":
        return _plain(report)
    raise ValueError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")


def print_rich(report: Report, console) -> None:
    """Print the report on a rich Console: tables, warnings in a panel, the diff highlighted."""
    from rich import box
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.table import Table as RichTable
    from rich.text import Text

    report = _printable(report)
    console.rule(Text(report.title, style="bold"))
    if report.warnings:
        console.print(Panel("\n".join(report.warnings), title="warning", border_style="bold yellow",
                            style="yellow"))
    for section in report.sections:
        console.print()
        console.print(Text(section.title, style="bold cyan"))
        if section.fields:
            grid = RichTable.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column(overflow="fold")
            for key, value in section.fields.items():
                grid.add_row(key, Text(value, style=_rich_style(value)))
            console.print(grid)
        for table in section.tables:
            rt = RichTable(title=table.title or None, title_justify="left", box=box.SIMPLE_HEAD, title_style="italic")
            for header in table.headers:
                rt.add_column(header, overflow="fold")
            for row in table.rows:
                rt.add_row(*(Text(_cell(c, "\n"), style=_rich_style(c)) for c in row))
            console.print(rt)
        if section.bars:
            console.print(_rich_bars(section.bars, width=40))
        if section.code is not None:
            console.print(Syntax(section.code, section.language, theme="ansi_dark", background_color="default"))
        for note in section.notes:
            console.print(Text(note, style="dim"))


def _printable(report: Report) -> Report:
    """The report with control characters escaped in its display text (`fxconvert.errors.printable`).

    Config values, names and paths reach it; the code block is generated code, whose user text
    is in repr() literals already.
    """
    def text(value):
        return printable(value) if isinstance(value, str) else [text(v) for v in value] if isinstance(
            value, (list, tuple)) else value

    return dataclasses.replace(report, title=printable(report.title), warnings=text(report.warnings), sections=[
        dataclasses.replace(s, title=printable(s.title), fields={k: text(v) for k, v in s.fields.items()},
                            tables=[Table(t.headers, [[text(c) for c in row] for row in t.rows], printable(t.title))
                                    for t in s.tables], notes=text(s.notes))
        for s in report.sections])


def _rich_bars(bars, *, width: int):
    """One bar per row, scaled so that the largest share fills `width` cells; the largest is highlighted."""
    from rich.text import Text

    largest = max((share for _, share, _ in bars), default=0) or 1
    label_width = max(len(label) for label, _, _ in bars)
    text = Text()
    for label, share, caption in bars:
        cells = round(width * share / largest)
        text.append(f"{label:<{label_width}} ")
        text.append("█" * cells, style="bold red" if share == largest else "cyan")
        text.append(" " * (width - cells) + f" {caption}\n")
    text.rstrip()
    return text


def _markdown(report: Report) -> str:
    from tabulate import tabulate

    out = [f"# {report.title}", ""]
    for w in report.warnings:
        out += [f"> **Warning:** {_md_escape(w)}", ""]
    for section in report.sections:
        out += [f"## {section.title}", ""]
        if section.fields:
            out += [f"- **{k}:** {_md_escape(v)}" for k, v in section.fields.items()] + [""]
        for table in section.tables:
            if table.title:
                out += [f"**{table.title}**", ""]
            rows = [[_md_escape(_cell(c, "<br>")) for c in row] for row in table.rows]
            out += [tabulate(rows, headers=table.headers, tablefmt="github", disable_numparse=True), ""]
        if section.code is not None:
            out += [f"```{section.language}", section.code, "```", ""]
        out += [f"_{_md_escape(n)}_" for n in section.notes] + ([""] if section.notes else [])
    return "\n".join(out)


def _plain(report: Report) -> str:
    from tabulate import tabulate

    out = [report.title, "=" * len(report.title)]
    out += [f"WARNING: {w}" for w in report.warnings]
    for section in report.sections:
        out += ["", section.title, "-" * len(section.title)]
        width = max((len(k) for k in section.fields), default=0)
        out += [f"{k + ':':<{width + 1}} {v}" for k, v in section.fields.items()]
        for table in section.tables:
            out += [""] + ([table.title] if table.title else [])
            rows = [[_cell(c, "\n") for c in row] for row in table.rows]
            out.append(tabulate(rows, headers=table.headers, tablefmt="simple", disable_numparse=True))
        if section.code is not None:
            out += ["", section.code]
        out += section.notes
    return "\n".join(out) + "\n"


# -- formatting --------------------------------------------------------------------------------


def _cell(value, newline: str) -> str:
    if isinstance(value, (list, tuple)):
        return newline.join(str(v) for v in value)
    return str(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _rich_style(value) -> str:
    text = str(value)
    if text in ("FAILED",) or text.startswith("FAILED"):
        return "bold red"
    if text in ("ok", "passed"):
        return "green"
    return ""


def _seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _diff(d) -> str:
    return "-" if d is None else f"{d:.2g}"


def _check_cell(check) -> str:
    if check is None:
        return ""
    return ("" if check.ok else "FAILED ") + (_diff(check.max_diff) if check.max_diff is not None else check.note)


def _short_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _dtype(node) -> str:
    val = node.meta.get("val")
    return str(val.dtype).removeprefix("torch.") if hasattr(val, "dtype") else ""


def _input_shape(name: str, model_class: str) -> str:
    family = families.family_of_class(model_class)
    kind, seq = family.inputs[name]
    dims = ["batch"] + ([] if kind == "class" else [family.sequence_lengths[seq]]) + (
        [family.hidden_field] if kind == "embeds" else [])
    return f"({', '.join(dims)})"


def _output_shape(val, model_class: str) -> str:
    """The output's shape with the tracer's example batch and lengths named (they are symbolic in the graph)."""
    if not hasattr(val, "shape"):
        return ""
    if val.dim() == 0:
        return "scalar"
    names = {0: {_EXAMPLE_SIZES["batch"]: "batch"},
             1: {_EXAMPLE_SIZES[seq]: name for seq, name in families.sequence_lengths(model_class).items()}}
    dims = [names.get(i, {}).get(s, str(s)) for i, s in enumerate(val.shape)]
    return f"({', '.join(dims)})"


def _config_summary(config, family) -> dict:
    keys = family.config_fields if family is not None else ()
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


def _name(conversion) -> str:
    return conversion.source.name if conversion.source is not None else "model object"
