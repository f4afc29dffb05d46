"""The report of an evaluation, written into its folder: results.json (every figure),
results.md (the method table in the PLVM paper's layout, then the optional tasks, skipped
items, method notes and unparseable answers) and results.png (a grouped bar chart).
On the real plvm-val set the paper's own figures are shown beside the measured ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from PIL import Image, ImageDraw, ImageFont

from ..answers import CAPTION_QUESTION
from ..fileio import write_image_atomic, write_json_atomic, write_text_atomic
from .items import TASK_TITLES

# Table 1 of the PLVM paper (LLaVA-1.5-7B, 16 context tokens) as quoted in plvm-val's README;
# seconds per concept from the paper's Table 7 (PLVM 0.006 s; Yo'LLaVA ~40 min of training).
PAPER_FIGURES: list[dict[str, Any]] = [
    {"method": "paper: PLVM", "positive": 89.5, "negative": 82.1, "mean": 85.8,
     "text_qa": 85.9, "visual_qa": 77.5, "seconds_per_concept": 0.006, "tokens_per_concept": 16},
    {"method": "paper: Yo'LLaVA", "positive": 74.5, "negative": 75.3, "mean": 74.9,
     "text_qa": 77.4, "visual_qa": 72.9, "seconds_per_concept": 2400.0, "tokens_per_concept": 16},
    {"method": "paper: LLaVA + text prompt", "positive": 80.3, "negative": 61.3, "mean": 70.8,
     "text_qa": 71.8, "visual_qa": 72.3, "seconds_per_concept": None, "tokens_per_concept": 16},
]


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _method_names(results: Mapping[str, Any]) -> list[str]:
    return list(results.get("method_order") or results["methods"])


def method_row(results: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The table figures of one evaluated method (accuracies as fractions)."""
    result = results["methods"][name]
    return {
        "method": name,
        "positive": result["recognition"]["positive"],
        "negative": result["recognition"]["negative"],
        "mean": result["recognition"]["mean"],
        "text_qa": result["text_qa"]["accuracy"],
        "visual_qa": result["visual_qa"]["accuracy"],
        "seconds_per_concept": result["seconds_per_concept"],
        "tokens_per_concept": result["tokens_per_concept"],
    }


def table_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method (accuracies as fractions), then the paper's rows when present."""
    rows = [dict(method_row(results, name), paper=False) for name in _method_names(results)]
    for figures in results.get("paper", []):
        row = dict(figures, paper=True)
        for key in ("positive", "negative", "mean", "text_qa", "visual_qa"):
            row[key] = figures[key] / 100
        rows.append(row)
    return rows


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the method table, the skipped and unparseable summaries, the protocol."""
    counts, protocol = results["counts"], results["protocol"]
    mcq = ("likelihood of each option's letter" if protocol["mcq"] == "likelihood"
           else "generated answer, parsed")
    lines = [
        f"# Evaluation: recipe `{results['recipe']}` (model `{results['model']}`)",
        "",
        f"- Test set: `{results['testset']}`: {counts['identities']} identities, "
        f"{counts['query_photos']} query photos",
        f"- Recognition: \"{protocol['recognition_question']}\" on {counts['recognition_items']} "
        f"(reference, query) pairs, {counts['recognition_positive']} of them positive",
        f"- Text QA: {counts['text_items']} questions; visual QA: {counts['visual_items']} "
        f"questions (of all rows, {counts['text_missing']} text and {counts['visual_missing']} "
        f"visual reference a missing file); MCQ answer: {mcq}",
        f"- Options: limit {protocol['limit'] or 'none'} per task, negatives per identity "
        f"{protocol['neg_per_identity'] if protocol['neg_per_identity'] is not None else 'all'}, "
        f"seed {protocol['seed']}, batch size {protocol['batch_size']}",
        "",
        "| Method | Recognition Pos | Recognition Neg | Recognition Mean | Text QA | Visual QA "
        "| s/concept | tokens/concept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table_rows(results):
        name = f"*{row['method']}*" if row["paper"] else row["method"]
        cells = [name] + [_percent(row[key]) for key in
                          ("positive", "negative", "mean", "text_qa", "visual_qa")]
        cells += [_number(row["seconds_per_concept"]), _number(row["tokens_per_concept"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracies in %."]
    if results.get("paper"):
        lines.append("Rows in italics: the PLVM paper's Table 1 (LLaVA-1.5-7B, 16 context tokens) "
                     "as quoted in the test set's README; s/concept from its Table 7 "
                     "(Yo'LLaVA: ~40 min of training per concept).")
    if results.get("retrieval"):
        lines += _retrieval_lines(results["retrieval"])
    lines += caption_lines(results, _method_names(results))
    lines += pair_lines(results, _method_names(results))
    lines += ["", "## Skipped items (not scored)", ""]
    for name in _method_names(results):
        skipped = results["methods"][name]["skipped"]
        if not skipped["total"]:
            lines.append(f"- {name}: none")
            continue
        parts = [f"{TASK_TITLES[r['task']]}: {r['count']} × {r['reason']}"
                 for r in skipped["reasons"]]
        lines.append(f"- {name}: {skipped['total']} ({'; '.join(parts)})")
    notes = [(name, note) for name in _method_names(results) for note in _method_notes(results["methods"][name])]
    if notes:
        lines += ["", "## Method notes", ""]
        lines += [f"- {name}: {note}" for name, note in notes]
    lines += ["", "## Unparseable answers (counted as wrong)", ""]
    for name in _method_names(results):
        unparseable = results["methods"][name]["unparseable"]
        by_task = ", ".join(f"{TASK_TITLES[t]} {n}" for t, n in unparseable["by_task"].items())
        example = ""
        if unparseable["examples"]:
            first = unparseable["examples"][0]
            example = f"; e.g. {first['key']}: {json.dumps(first['answer'])}"
        lines.append(f"- {name}: {unparseable['total']} ({by_task}){example}")
    lines.append("")
    return "\n".join(lines)


def _method_notes(method: Mapping[str, Any]) -> list[str]:
    """results.md: what a reader must know about a method's numbers (its details' note, where
    its negatives came from, how many "no"s retrieval gave without the model)."""
    notes = [(method.get("details") or {}).get("note")]
    if method.get("negatives"):
        notes.append(f"trained with negatives from {method['negatives']}")
    decided = method["recognition"].get("decided_by_retrieval") or {}
    if decided.get("answers"):
        notes.append(f"{decided['no']} of its {decided['of_no_answers']} recognition \"no\" answers were "
                     f"decided by retrieval alone, without the model ({decided['correct']} of them correct)")
    return [note for note in notes if note]


def _retrieval_lines(found: Mapping[str, Any]) -> list[str]:
    """results.md: the "who is in this photo" section."""
    lines = ["", "## Who is in this photo (retrieval)", "",
             f"Every query photo ({found['photos']}) searched for all {found['identities']} test "
             f"identities' retrieval keys ({found['crops']} crops, "
             + (f"the {found['verify']} best candidates verified by asking the model "
                + ("one \"Who of ...?\" question about them all" if found.get("verify_by") == "together"
                   else "about each")
                if found.get("verify") else f"cosine >= {found['threshold']:g}")
             + f", at most {found['top_k']} per photo).", "",
             "| Precision | Recall | F1 | Top-1 | found / true / correct |", "|---:|---:|---:|---:|---:|",
             f"| {_percent(found['precision'])} | {_percent(found['recall'])} | {_percent(found['f1'])} "
             f"| {_percent(found['top1_accuracy'])} | {found['predicted']} / {found['actual']} / "
             f"{found['true_positive']} |"]
    best = found.get("best_threshold")
    if best and not found.get("verify"):
        lines += ["", f"Calibrated on this set: threshold {best['threshold']:.4f} gives precision "
                      f"{_percent(best['precision'])}, recall {_percent(best['recall'])}, F1 "
                      f"{_percent(best['f1'])} (set it with `--set retrieval.threshold=...` or the "
                      f"recipe's `retrieval:` section; choose it on another set than the one reported)."]
    return lines


_CHART_METRICS = (("positive", "Rec. Pos"), ("negative", "Rec. Neg"), ("mean", "Rec. Mean"),
                  ("text_qa", "Text QA"), ("visual_qa", "Visual QA"))
_CHART_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                  (140, 86, 75), (227, 119, 194), (127, 127, 127))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without a scalable default font
        return ImageFont.load_default()


def draw_chart(results: Mapping[str, Any], path: str | Path) -> None:
    """results.png: grouped bars, one group per accuracy metric, one bar per method."""
    methods = [row for row in table_rows(results) if not row["paper"]]
    width, height = 960, 540
    left, right, top, bottom = 80, 200, 70, 80
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, font, small = _font(20), _font(14), _font(11)

    draw.text((left, 18), f"plvmctl eval: recipe {results['recipe']}", fill="black",
              font=title_font)
    for tick in range(0, 101, 20):  # y grid and tick labels
        y = top + plot_h - plot_h * tick / 100
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), str(tick), fill="black", font=font, anchor="rm")
    draw.line([(left, top), (left, top + plot_h)], fill="black")
    draw.line([(left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")

    group_w = plot_w / len(_CHART_METRICS)
    bar_w = group_w * 0.8 / max(1, len(methods))
    for g, (key, label) in enumerate(_CHART_METRICS):
        group_x = left + g * group_w + group_w * 0.1
        for m, row in enumerate(methods):
            x0 = group_x + m * bar_w
            value = row[key]
            colour = _CHART_COLOURS[m % len(_CHART_COLOURS)]
            if value is None:
                draw.text((x0 + bar_w / 2, top + plot_h - 4), "n/a", fill="gray", font=small,
                          anchor="md")
                continue
            y = top + plot_h - plot_h * value
            draw.rectangle([x0 + 1, y, x0 + bar_w - 1, top + plot_h], fill=colour)
            draw.text((x0 + bar_w / 2, y - 2), f"{100 * value:.0f}", fill="black", font=small,
                      anchor="md")
        draw.text((left + g * group_w + group_w / 2, top + plot_h + 8), label, fill="black",
                  font=font, anchor="ma")
    draw.text((left + plot_w / 2, height - 24), "metric", fill="black", font=font, anchor="mm")

    y_label = Image.new("RGB", (160, 24), "white")  # rotated y-axis label
    ImageDraw.Draw(y_label).text((80, 12), "accuracy (%)", fill="black", font=font, anchor="mm")
    y_label = y_label.rotate(90, expand=True)
    image.paste(y_label, (14, top + plot_h // 2 - y_label.height // 2))

    legend_x, legend_y = left + plot_w + 20, top
    draw.text((legend_x, legend_y), "method", fill="black", font=font)
    for m, row in enumerate(methods):
        y = legend_y + 26 + m * 24
        colour = _CHART_COLOURS[m % len(_CHART_COLOURS)]
        draw.rectangle([legend_x, y, legend_x + 16, y + 16], fill=colour)
        draw.text((legend_x + 24, y + 8), row["method"], fill="black", font=font, anchor="lm")

    write_image_atomic(path, image)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> None:
    """results.json, results.md and results.png in `out_dir` (each written atomically)."""
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "results.json", results)
    write_text_atomic(out_dir / "results.md", render_markdown(results))
    draw_chart(results, out_dir / "results.png")


def caption_lines(results: Mapping[str, Any], names: list[str]) -> list[str]:
    """The caption section (recall and name precision) of the methods of `names` whose results
    have captions (`eval --captions`); [] when none has."""
    captioned = [name for name in names if results["methods"][name].get("caption")]
    if not captioned:
        return []
    lines = ["", "## Caption recall (MyVLM's metric) and name precision", "",
             f"\"{CAPTION_QUESTION}\" for every query photo, with the test identities in it and one "
             "who is not given to the prompt (plvm-auto: those it found by retrieval). Recall: a "
             "concept in the photo counts when the description says it is there (\"I do not see "
             "<a>\" does not count; read from the conclusion of an answer that compares first). "
             "Name precision: of the test identities a description says are there, the share in "
             "the photo.", "",
             "| Method | Caption recall | photos naming all | named / pairs | Name precision "
             "| photos naming someone absent |", "|---|---:|---:|---:|---:|---:|"]
    for name in captioned:
        c = results["methods"][name]["caption"]
        lines.append(f"| {name} | {_percent(c['recall'])} | {_percent(c['photos_all_named'])} "
                     f"| {c['named']} / {c['pairs']} | {_percent(c.get('name_precision'))} "
                     f"| {_percent(c.get('photos_naming_absent'))} |")
    return lines


def pair_lines(results: Mapping[str, Any], names: list[str]) -> list[str]:
    """The "Several concepts in one question" section of the methods of `names` whose results
    have pairs (`eval --pairs`), one row each; [] when none has."""
    paired = [name for name in names if results["methods"][name].get("pairs")]
    if not paired:
        return []
    lines = ["", "## Several concepts in one question", "",
             "Per query photo of identity A, B (C, D) test identities not in it, every named concept's "
             "sentence in the prompt: \"Is <A> in this photo?\" (yes) and \"Is <B> ...?\" (no) with both; "
             "\"Which of <A> and <B> ...?\" and \"Which of <A>, <B> and <C> ...?\" (A: the first of "
             "the names the answer's conclusion says); \"Who of <4 names> ...?\" (A, or nobody on a "
             "quarter of the photos). Per group photo (a toy set's groups/: two or three test "
             "identities together): \"Are <a> and <b> both in this photo?\" (yes; and no with one who "
             "is absent), \"Is <a> to the left of <b>?\" and \"Who of ...?\" of everyone there and "
             "others up to four. Who-of: micro precision / recall / F1 over the names. Apart from "
             "the table above, whose numbers it does not change.", "",
             "| Method | Rec. Pos | Rec. Neg | Which of 2 | Which of 3 | Both Pos | Both Neg | Left of "
             "| Who-of P | Who-of R | Who-of F1 | Unparseable |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in paired:
        pair = results["methods"][name]["pairs"]
        rec, both, who = pair["recognition"], pair.get("both", {}), pair.get("who4", {})
        unparsed = sum(pair.get(kind, {}).get("unparseable", 0) for kind in ("which", "which3", "left_of", "who4"))
        unparsed += rec.get("unparseable", 0) + both.get("unparseable", 0)
        cells = [rec.get("positive"), rec.get("negative"), pair["which"]["accuracy"],
                 pair.get("which3", {}).get("accuracy"), both.get("positive"), both.get("negative"),
                 pair.get("left_of", {}).get("accuracy"), who.get("precision"), who.get("recall"), who.get("f1")]
        lines.append(f"| {name} | " + " | ".join(_percent(cell) for cell in cells) + f" | {unparsed} |")
    return lines
