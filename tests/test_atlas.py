"""Stage 10, the atlas: relevance by activation × gradient against a hand computation, the static
pages of a whole fake run (escaping, assets, scores or "not scored", debugging pages), the search
server, and the site driven in headless Chromium (sort, filter, neighbour link, map hover,
injected markup, live search through `make serve`)."""
import collections
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from atlas_fixture import (ATTRIBUTE, CONTROL_CORR, HELD_OUT, SCRIPT, SUB_EVIL, fake_run, make,
                           write_scores)
from common.attribution import channel_attribution
from tools.browser import NoBrowser, headless_chromium, wait_ready
from common.artefacts import read_audit, read_audit_summary, read_baskets, read_label_concepts, read_labels
from common.io import read_csv
from common.io import safe_name
from common.glossary import TERMS, Z_95
from common.render import fmt_number, json_for_script
from common.scores import margin_interval
from conftest import ROOT, load_stage

atlas = load_stage("10_atlas")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The fake pipeline run once for this module: (project tree, make args, run folder)."""
    return fake_run(tmp_path_factory.mktemp("atlas"))


# ----------------------------------------------------------------------------------------------
# Pieces


def test_attribution_is_exact_before_a_linear_head(fake_bundle):
    """After relu2 the fake model is global average pooling + a linear layer, so a channel's
    relevance is its weight × its mean activation, and the relevances add up to logit − bias."""
    model = fake_bundle.model
    images = torch.rand(3, 3, 32, 32)
    classes = [0, 1, 1]
    relevance, logits = channel_attribution(model, ["relu2", "relu1"], images, classes)
    with torch.no_grad():
        x = model.pool(torch.relu(model.conv1(images)))
        mean_act = torch.relu(model.conv2(x)).mean(dim=(2, 3))  # B × 2
        full = model(images)
    w, b = model.fc.weight, model.fc.bias
    for i, k in enumerate(classes):
        expected = w[k] * mean_act[i]
        assert torch.allclose(relevance["relu2"][i], expected, atol=1e-5)
        assert relevance["relu2"][i].sum().item() == pytest.approx((full[i, k] - b[k]).item(),
                                                                    abs=1e-4)
        assert logits[i].item() == pytest.approx(full[i, k].item(), abs=1e-5)
    # relu1 is an in-place ReLU: its relevance still has one value per channel, and class 0
    # ("red") gets nothing from the edge and brightness channels, which feed only class 1's path.
    assert relevance["relu1"].shape == (3, 4)
    assert torch.all(relevance["relu1"][0, 1:] == 0)
    assert not any(p.grad is not None for p in model.parameters())
    # Two classes per image from one forward pass give the same as two separate calls.
    both, both_logits = channel_attribution(model, ["relu2"], images, [classes, [2, 2, 0]])
    assert torch.allclose(both["relu2"][0], relevance["relu2"], atol=1e-6)
    other, _ = channel_attribution(model, ["relu2"], images, [2, 2, 0])
    assert torch.allclose(both["relu2"][1], other["relu2"], atol=1e-6)
    assert both_logits.shape == (2, 3)


def test_json_for_script_cannot_close_a_script():
    """No markup character survives, and the text still decodes to the same value."""
    text = "</script><!-- & \u2028"
    out = str(json_for_script({"d": text}))
    assert "<" not in out and ">" not in out and "&" not in out and "\u2028" not in out
    assert json.loads(out) == {"d": text}
    assert fmt_number("") == "–" and fmt_number(2.0) == "2" and fmt_number(0.12345) == "0.123"


def test_no_template_lets_text_through_unescaped():
    """Model-written text reaches every page through the templates' escaping: no template marks a
    value ``|safe`` or turns autoescaping off (values that are markup already come from Python
    as ``Markup``: json_for_script, inline_css, md_url)."""
    from jinja2 import nodes
    from common.render import TEMPLATES, environment
    found = []
    for path in sorted(TEMPLATES.glob("*.*")):
        if path.suffix not in (".html", ".md"):
            continue
        tree = environment(path.suffix == ".md").parse(path.read_text(encoding="utf-8"))
        found += [f"{path.name}: |safe" for f in tree.find_all(nodes.Filter) if f.name == "safe"]
        found += [f"{path.name}: autoescape"
                  for _ in tree.find_all(nodes.ScopedEvalContextModifier)]
    assert len(list(TEMPLATES.glob("atlas_*.html"))) >= 10
    assert found == []


def test_basket_page_escapes_every_model_written_field():
    """A basket's sentence, its members' descriptions (the link titles), class and layer names and
    the run's name, all carrying markup, are shown as text on baskets.html."""
    from types import SimpleNamespace
    from common.render import render
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    row = SimpleNamespace(basket=f"b{evil}", parent=2, level=1, n_images=12, size=2,
                          cohesion=0.5, purity=0.8, db_ratio=0.4, consistency=0.9,
                          random_consistency=0.1, name=f"labelled {evil}",
                          description=f"red {evil} blobs", mosaic=f"11_baskets/{evil}.png")
    layer = {"name": f"relu{evil}", "slug": "relu1", "neurons": 4,
             "baskets": [{"row": row, "anchor": "b-relu1-1", "thumb": "b.jpg",
                          "members": [{"url": "neurons/relu1/0.html", "channel": 0,
                                       "description": f"member {evil}"},
                                      {"url": "", "channel": 1, "description": ""}],
                          "pruning": [f"cls{evil}"]}]}
    site = {"run": f"run{evil}", "layers": [], "has_trace": False, "has_debug": False,
            "reports": []}
    consistency = [SimpleNamespace(layer=f"relu{evil}", n_baskets=1, mean_size=2.0,
                                   consistency=0.9, consistency_sd=0.01, random_index=0.1,
                                   random_index_sd=0.02, repeats=5)]
    pruning = [SimpleNamespace(class_idx=0, class_name=f"cls{evil}", n_images=10, n_baskets=1,
                               pruned="", p_before=0.9, delta_basket=-0.2, delta_basket_sd=0.01,
                               delta_random_basket=-0.01, delta_random_basket_sd=0.01,
                               delta_random_index=0.0, delta_random_index_sd=0.0, repeats=5)]
    page = render("atlas_baskets.html", site=site, root="", layers=[layer],
                  meta={"method": "finch", "alpha": 3, "beta": 0.75}, total=1, members=2,
                  consistency=consistency, pruning=pruning)
    assert "<script>" not in page and "<img src=x" not in page
    escaped = "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
    for text in ("red ", "member ", "cls", "relu", "run", "b", "labelled ", "11_baskets/"):
        assert text + escaped in page, text


# ----------------------------------------------------------------------------------------------
# The static site of the fake run


def test_static_site(run):
    """Every page exists, model text is escaped, assets are stored once, thumbnails are JPEG."""
    _, _, run_dir = run
    site = run_dir / "atlas"
    index = (site / "index.html").read_text()
    assert "fake_model.py:build" in index
    assert "76.9%" in index  # 20 of the 26 labelled images are right (6 bars filed as red)
    assert "fake-matcher" in index and "Not scored" not in index
    for layer, channels in (("relu1", 4), ("conv2", 2)):
        assert (site / "layers" / f"{layer}.html").exists()
        assert (site / "maps" / f"{layer}.html").exists()
        for c in range(channels):
            assert (site / "neurons" / layer / f"{c}.html").exists()
            assert (site / "thumbs" / layer / f"{c}.jpg").read_bytes()[:2] == b"\xff\xd8"
            # CROP=rf: the page draws its tiles from images/, it has no mosaic copy of its own
            assert not (site / "mosaics").exists()
            assert 'id="mosaic"' in (site / "neurons" / layer / f"{c}.html").read_text()
    # Thumbnails are JPEG, top images WebP: the only PNGs are 05's word clouds, copied as drawn
    # (and the debugging pages' activation maps, small PNGs with transparency).
    assert {p.parent.name for p in site.rglob("*.png") if "debug" not in p.parts} == {"wordclouds"}
    assert [p.name for p in site.rglob("plotly*.js")] == ["plotly.min.js"]
    pages = list(site.rglob("*.html"))
    assert all("Plotly.newPlot" not in p.read_text()[:5000] or p.stat().st_size < 100_000
               for p in pages)  # plotly.js referenced, never inlined
    neuron = (site / "neurons" / "relu1" / "0.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; red blobs" in neuron
    assert "<script>alert" not in neuron
    assert "&lt;b&gt;bold&lt;/b&gt;" in neuron and "<b>bold</b>" not in neuron
    assert "clarity" in neuron and "sub-concepts" in neuron.lower()
    # the sub-concept table lists what differs between them, not the neuron's scores again
    table = neuron[neuron.index("<th>sub-concept</th>"):]
    table = table[:table.index("</thead>")]
    assert 'glossary.html#verify_corr"' in table and 'glossary.html#selectivity"' not in table
    assert 'glossary.html#redundancy"' not in table
    other = (site / "neurons" / "relu1" / "1.html").read_text()
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in other
    # 09's refinement: a neuron page lists the candidates its sentence beat, escaped, and shows
    # the chosen (final) sentence
    from markupsafe import escape
    from common.artefacts import read_candidates, read_score_rows
    final = {r.key: r.description for r in read_score_rows(run_dir / "09_scores.csv")
             if r.subconcept is None}
    beaten = collections.defaultdict(list)
    for c in read_candidates(run_dir / "09_candidates.csv"):
        if c.subconcept is None and not c.chosen:
            beaten[c.key].append(c.description)
    assert set(beaten) == {("relu1", 0)} and len(beaten["relu1", 0]) == 2
    for (layer, c), texts in beaten.items():
        page = (site / "neurons" / layer / f"{c}.html").read_text(encoding="utf-8")
        section = page[page.index('id="candidates"'):page.index("<h2>Scores</h2>")]
        assert all(str(escape(t)) in section for t in texts) and "<i>refined" not in section
        assert section.index("refined</td>") < section.index("subconcept</td>")  # best first
        assert str(escape(final[(layer, c)])) in page[page.index('id="description"'):]
    assert 'id="candidates"' not in (site / "neurons" / "relu1" / "1.html").read_text()
    for script in (site / "data").glob("*.js"):
        assert "<" not in script.read_text()  # model text reaches the page as JSON, escaped
    assert (site / "sankey.html").exists() and (site / "search.html").exists()


def page_tiles(page: Path) -> dict:
    """The ATLAS_TILES object a neuron page hands its script."""
    text = page.read_text(encoding="utf-8")
    return json.loads(re.search(r"window.ATLAS_TILES = (.*?);</script>", text).group(1))


def test_tiles_are_the_top_k_in_order_with_their_images_and_windows(run):
    """A neuron page's tiles are its top-k of 01 in rank order (image ids, activations), each
    with the window 02 cut (common.fields.tile_window), and every image is copied once into
    images/ as the network saw it; data/images.js names each image's label and prediction; a
    layer whose maps 01 stored gets them in actmaps/, one cell per tile on the neuron's scale."""
    from PIL import Image
    from common.artefacts import read_activations, read_predictions
    from common.fields import RF, tile_window
    _, _, run_dir = run
    site = run_dir / "atlas"
    layers, (height, width), topk = read_activations(run_dir / "01_activations.npz")
    preds = {r.image_id: r for r in read_predictions(run_dir / "01_predictions.csv")}
    script = (site / "data" / "images.js").read_text(encoding="utf-8")
    images = json.loads(script[script.index("{"):script.rindex("}") + 1])
    for layer in layers:
        top = topk[layer]
        for c in range(top.channels):
            tiles = page_tiles(site / "neurons" / layer / f"{c}.html")
            ids = [int(i) for i in top.image_ids[c] if i >= 0][:tiles["grid"] ** 2]
            assert [t[0] for t in tiles["tiles"]] == ids
            assert np.allclose([t[1] for t in tiles["tiles"]], top.values[c][:len(ids)],
                               rtol=1e-3)
            rf = RF.from_array(top.rf)
            assert [t[2:] for t in tiles["tiles"]] == [
                list(tile_window(rf, int(y), int(x), height, width)[:2])
                for y, x in zip(top.y[c][:len(ids)], top.x[c][:len(ids)])]
            for i in ids:
                with Image.open(site / "images" / f"{i}.webp") as img:
                    assert img.format == "WEBP" and img.size == (width, height)
                assert images[str(i)][1] == preds[i].pred_name
            if top.maps is not None:
                h, w = top.maps.shape[2:]
                with Image.open(site / tiles["map"]) as strip:
                    grey = np.asarray(strip.convert("L")).astype(float)
                cols = tiles["map_columns"]
                # The best tile's strongest cell is the neuron's top activation: white (lossy).
                assert grey[:h, :w].max() >= 235
                assert tiles["map_cell"] == [h, w] and cols >= 1
            else:
                assert tiles["map"] == ""
    assert len(list((site / "images").glob("*.webp"))) == len(images)


def test_debug_pages_name_the_neurons_behind_the_error(run):
    """08's pair has a page per misclassified image; on the fake model the only conv2 neuron
    feeding class 1 ("edgy") is channel 1 (the summed edges), so it tops that layer."""
    _, _, run_dir = run
    pairs = [p for p in (run_dir / "08_debug").iterdir() if p.is_dir()]
    assert len(pairs) == 1
    folder = run_dir / "atlas" / "debug" / pairs[0].name
    pages = sorted(folder.glob("[0-9]*.html"))
    assert len(pages) == 6
    assert (folder / "report.html").exists() and (folder / "index.html").exists()
    page = pages[0].read_text()
    conv2 = page[page.index("<h3>conv2</h3>"):]
    rows = conv2[conv2.index("<tbody>"):]
    first_row = rows[:rows.index("</tr>")]
    assert "#1</a>" in first_row
    assert "activation × the gradient" in page
    # A layer can be sorted by the pair's 08 z and by the mean relevance to the wrong class.
    data = (run_dir / "atlas" / "data" / "conv2.js").read_text()
    assert "relevance 0→1" in data and "z 0→1" in data
    # The neuron pages point back to the images they drove.
    assert "misclassified image" in (run_dir / "atlas" / "neurons" / "conv2" / "1.html").read_text()
    # The pair's page gives each flagged neuron 09's trust figures (08 itself does not wait for
    # 09): the fixture's verify_corr 0.5 and clarity 0.9 − 0.2 × channel.
    from common.render import fmt_number
    index = (folder / "index.html").read_text()
    flagged = index[index.index("Neurons flagged by 08"):]
    rows = flagged[flagged.index("<tbody>"):flagged.index("</tbody>")].split("</tr>")[:-1]
    assert rows and "verified r" in flagged
    for row in rows:
        channel = int(row.split(" #")[1].split("<")[0])
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert cells[6:8] == [fmt_number(0.5), fmt_number(round(0.9 - 0.2 * channel, 3))]


def test_debug_pages_answer_why_with_maps_and_links_that_stay_inside_the_atlas(run, tmp_path):
    """A misclassified image's page ranks the neurons of all layers together as 08's why.npz
    does, each with its activation map over the image; the pair's page has one hoverable z cell
    per neuron naming layer, channel and z; 08's report, rendered by the atlas, links its
    neurons to their pages and back to the pair. Every link and image of the debugging pages
    resolves inside a copy of the atlas folder, with the run folder gone."""
    from common.artefacts import read_why
    _, _, run_dir = run
    pair = next(p for p in (run_dir / "08_debug").iterdir() if p.is_dir())
    why = read_why(pair / "why.npz")
    assert why is not None and len(why.image_ids) == 6
    copy = tmp_path / "elsewhere" / "atlas"
    shutil.copytree(run_dir / "atlas", copy)
    folder = copy / "debug" / pair.name
    i = int(why.image_ids[0])
    page = (folder / f"{i}.html").read_text()
    table = page[page.index('<table class="why">'):page.index("</table>", page.index('class="why"'))]
    shown = re.findall(r'<td><a href="\.\./\.\./neurons/([^/]+)/(\d+)\.html">[^<]+ #\d+</a>',
                       table)
    assert shown == [(r["layer"], str(r["channel"])) for r in why.of(i)] and shown
    heats = re.findall(r'class="heat" src="([^"]+)"', table)
    assert len(heats) == len(shown) and all((folder / h).is_file() for h in heats)
    assert 'data-term="error_share"' in table
    from PIL import Image
    with Image.open(folder / heats[0]) as heat:
        assert heat.size == (28, 28) and heat.convert("RGBA").getextrema()[3][1] > 0
    # The deepest layer's per-layer table comes first.
    assert page.index("<h3>conv2</h3>") < page.index("<h3>relu1</h3>")
    index = (folder / "index.html").read_text()
    cells = re.findall(r'<a style="background:[^"]+" href="[^"]+" title="([^"]+)"', index)
    assert len(cells) == 4 + 2
    assert cells[0].startswith("conv2 · channel 0 · z = ") and \
        any(c.startswith("relu1 · channel 3 · z = ") for c in cells)
    report = (folder / "report.html").read_text()
    assert 'href="index.html"' in report and "Why these images were called" in report
    assert len(re.findall(r'href="\.\./\.\./neurons/(relu1|conv2)/\d\.html"', report)) >= 3
    assert "<script>alert" not in report
    checked = 0
    for html_file in (copy / "debug").rglob("*.html"):
        text = html_file.read_text()
        for target in re.findall(r'(?:href|src)="([^"#?]+)[^"]*"', text):
            if target.startswith(("data:", "http:", "https:", "mailto:")):
                continue
            resolved = (html_file.parent / target).resolve()
            assert resolved.is_relative_to(copy.resolve()), (html_file, target)
            assert resolved.exists(), (html_file, target)
            checked += 1
    assert checked > 100
    assert "error_share" in (copy / "glossary.html").read_text()


def test_08_attributes_the_first_misclassified_images_and_10_only_renders(run, fake_bundle,
                                                                          tmp_path):
    """08 writes the relevances the atlas shows: those of the lowest-id KO images of its pair,
    equal bit for bit to common.attribution on the images prepared as 01 prepared them; 10
    builds the atlas from them without importing torch (it loads no model)."""
    from common.artefacts import read_attributions, read_predictions
    from common.images import load_rgb, network_input, to_tensor
    _, _, run_dir = run
    att = read_attributions(run_dir / "08_debug" / "attributions.npz")
    ko = sorted(p.image_id for p in read_predictions(run_dir / "01_predictions.csv")
                if p.label_idx == 0 and p.pred_idx == 1)
    assert list(att.image_ids) == ko[:att.max_images] and att.max_images == 30 and len(ko) == 6
    pictures = [network_input(load_rgb(p.path)[0], 32)
                for p in read_predictions(run_dir / "01_predictions.csv") if p.image_id in ko]
    batch = torch.stack([to_tensor(p, fake_bundle.mean, fake_bundle.std) for p in pictures])
    relevance, logits = channel_attribution(fake_bundle.model, att.layers, batch,
                                            [[1] * len(ko), [0] * len(ko)])
    for layer in att.layers:
        assert np.array_equal(att.wrong[layer], relevance[layer][0].numpy())
        assert np.array_equal(att.right[layer], relevance[layer][1].numpy())
    assert np.array_equal(att.logit_wrong, logits[0].numpy())
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("atlas"))
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']; "
              "from tools.stages import load_stage; "
              "atlas = load_stage('10_atlas'); "
              "atlas.build(__import__('pathlib').Path(sys.argv[2]), atlas.Settings(workers=1)); "
              "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", script, str(ROOT), str(copy)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((copy / "atlas" / "debug").rglob("[0-9]*.html"))) == 6


def test_atlas_without_scores_says_not_scored(run, tmp_path):
    """Without 09's files the atlas still builds and says the neurons are not scored."""
    _, _, run_dir = run
    copy = tmp_path / "t"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("atlas", "09_*"))
    atlas.main(["--run", str(copy), "--workers", "1"])
    assert "Not scored" in (copy / "atlas" / "index.html").read_text()
    neuron = (copy / "atlas" / "neurons" / "relu1" / "0.html").read_text()
    assert "Not scored" in neuron
    assert "verdict good" not in neuron and "Described" not in neuron  # no verdict invented
    assert 'id="scores"' not in neuron
    assert "clarity" not in (copy / "atlas" / "data" / "relu1.js").read_text()


def section(page: str, start: str, end: str) -> str:
    """The part of ``page`` from ``start`` to the next ``end``."""
    part = page[page.index(start):]
    return part[:part.index(end)]


def test_trust_is_explained_by_one_glossary(run):
    """The glossary page has an entry per score (its texts from common/glossary.py, escaped);
    every glossary link of the atlas lands on one; score headers carry the entry's tooltip; each
    neuron page opens with the verdict the fixture planted, the interval of common.scores and
    the control's sentence (escaped), and keeps the raw table behind a disclosure."""
    from markupsafe import escape  # as the templates escape (Jinja's autoescape)
    _, _, run_dir = run
    site = run_dir / "atlas"
    glossary = (site / "glossary.html").read_text()
    for key, t in TERMS.items():
        entry = section(glossary, f'id="{key}"', "</section>")
        for text in (t.name, t.tip, t.measures, t.range, t.reading):
            assert escape(text) in entry, (key, text)
    anchors = set(re.findall(r'id="([^"]+)"', glossary))
    linked = set()
    for page in site.rglob("*.html"):
        linked |= set(re.findall(r'glossary\.html#([^"]+)"', page.read_text()))
    assert {"verify_corr", "z", "q", "silhouette", "margin", "clarity"} <= linked <= anchors
    # relu1: channel 0 beats its control on 200 images, 1 on 12 only, 2 loses to it.
    levels = {0: "Described reliably", 1: "Described weakly", 2: "Not better than chance"}
    for channel, headline in levels.items():
        page = (site / "neurons" / "relu1" / f"{channel}.html").read_text()
        verdict = section(page, '<section id="verdict"', "</section>")
        assert page.index('id="verdict"') < page.index('id="mosaic"')  # the page opens with it
        assert f"<strong>{headline}</strong>" in verdict
        control = CONTROL_CORR.get(channel, 0.1)
        d, low, high = margin_interval(0.5, control, HELD_OUT.get(channel, 200), Z_95)
        assert f"margin {d:+.2f} (95 % interval {low:+.2f} … {high:+.2f})" in verdict
        assert f'href="../../neurons/relu1/{(channel + 1) % 4}.html"' in verdict
        scores = section(page, '<details id="scores">', "</details>")
        assert "<details id=\"scores\" open" not in page  # closed until asked for
        assert 'data-term="dnr_score"><a class="term" href="../../glossary.html#dnr_score">' \
            in scores
        assert TERMS["dnr_score"].tip not in page  # the tip is in assets/terms.js only
    last = section((site / "neurons" / "relu1" / "3.html").read_text(), '<section id="verdict"',
                   "</section>")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; red blobs" in last  # neuron 0's sentence
    assert "<script>" not in last
    # Headers of the run, pair and compare pages take the glossary's tooltips too, from the one
    # shared script of tips.
    tips = json.loads((site / "assets" / "terms.js").read_text().split(" = ", 1)[1]
                      .rstrip(";\n"))
    assert {k: tips[k] for k in TERMS} == {k: t.tip for k, t in TERMS.items()}
    assert tips["mean_clarity"] == f"Layer mean: {TERMS['clarity'].tip[0].lower()}" \
                                   f"{TERMS['clarity'].tip[1:]}"
    index = (site / "index.html").read_text()
    assert 'data-term="silhouette"' in index and 'data-term="mean_clarity"' in index
    pair = next((site / "debug").glob("*/index.html")).read_text()
    for key in ("z", "q", "verify_corr", "clarity"):
        assert f'data-term="{key}"' in pair, key
    assert "<th>|z| ≥ 2 by</th><th>FDR flag by</th>" in pair  # the thesis's flag and BH's apart
    # 05's word clouds sit beside each layer's keywords; which embedding clusters better, too.
    assert 'data-term="better"' in index
    clouds = sorted(p.name for p in (site / "wordclouds").glob("*.png"))
    assert clouds == sorted(f"{p.stem.removesuffix('_wordcloud')}.png"
                            for p in (run_dir / "05_plots").glob("*_wordcloud.png")) != []
    assert all(f'src="wordclouds/{name}"' in index for name in clouds)
    # The layer's data script carries the names and tips its sort menu and card chips show.
    data = json.loads((site / "data" / "relu1.js").read_text().split("] = ", 1)[1].rstrip(";\n"))
    assert data["terms"]["verify_corr"] == {"n": "verified r", "s": "verified r",
                                            "t": TERMS["verify_corr"].tip, "a": "verify_corr"}
    assert data["terms"]["z 0→1"]["a"] == "z" and set(data["columns"]) <= set(data["terms"])


def test_a_neuron_09_could_not_verify_gets_no_verdict(run, tmp_path):
    """A neuron with a 09 row but no verification says why there is no verdict and shows no
    margin; its neighbours keep theirs."""
    _, _, run_dir = run
    copy = tmp_path / "t"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("atlas"))
    write_scores(copy, unverified=(("relu1", 2),))
    atlas.main(["--run", str(copy), "--workers", "1"])
    page = (copy / "atlas" / "neurons" / "relu1" / "2.html").read_text()
    verdict = section(page, '<section id="verdict"', "</section>")
    assert "<strong>No verdict</strong>: 09 could not verify" in verdict
    assert "95 % interval" not in verdict and "control sentence" not in verdict
    assert "Described reliably" in (copy / "atlas" / "neurons" / "relu1" / "0.html").read_text()


def test_inputs_from_another_run_are_refused(run, tmp_path):
    """A 09 file made from other descriptions is refused before anything is written."""
    _, _, run_dir = run
    copy = tmp_path / "t"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("atlas"))
    meta = json.loads((copy / "09_score.meta.json").read_text())
    meta["lineage"]["03_describe"] = "0000000000000000"
    (copy / "09_score.meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit):
        atlas.main(["--run", str(copy), "--workers", "1"])
    assert not (copy / "atlas").exists()


def broken_links(site) -> list[str]:
    """Every link and image of the atlas's pages (``href``, ``src``) to a file that does not
    exist, as ``page → target``; fragments are ignored, web addresses are not checked."""
    broken = []
    for page in site.rglob("*.html"):
        for target in re.findall(r'(?:href|src)="([^"#]*)', page.read_text()):
            target = html.unescape(target)
            if target and ":" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(site)} → {target}")
    return broken


def quiet(tree, args, *targets) -> int:
    """Exit status of ``make -q`` (0: up to date)."""
    return subprocess.run(["make", "--no-print-directory", "-q", *targets, *args], cwd=tree,
                          capture_output=True, timeout=300).returncode


def test_reports_made_on_request_are_shown_linked_and_dropped_when_stale(run, tmp_path):
    """`make baskets`, `make audit` and `make compare` each end with the atlas, which then links
    the report from the run page and from every neuron that appears in it (its basket, the
    classes it is relevant to with its audit label, its best match in the other run); every link
    resolves. When a run a report was made from changes, the atlas is out of date, and rebuilt it
    stops showing that report and names the command that refreshes it."""
    tree, args, run_dir = run
    data = tmp_path / "data"
    shutil.copytree(run_dir.parent / "t", data / "t", symlinks=True)  # copy2: times kept
    shutil.copytree(run_dir.parent / "t", data / "u", symlinks=True)  # a second run to compare
    args = [a if not a.startswith("DATA=") else f"DATA={data}" for a in args]
    folder, site = data / "t", data / "t" / "atlas"
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text("classes:\n  '0':\n    valid: [red]\n    spurious: [edges]\n")
    small = ["PRUNE=1", "CONTROLS=1", "PRUNE_IMAGES=3", "REPEATS=1", "BASKET_ALPHA=0.5",
             "BASKET_BETA=0.6"]  # 4 and 2 channels: μ + 3σ is out of reach
    assert quiet(tree, args, "atlas") == 0
    make(tree, [*args, *small], "baskets")
    assert 'href="baskets.html"' in (site / "index.html").read_text()
    make(tree, [*args, *small, f"AUDIT={concepts}"], "audit")
    make(tree, args, "compare", "OTHER=u")
    for made in ([*small], [*small, f"AUDIT={concepts}"], ["OTHER=u"]):
        assert quiet(tree, [*args, *made], "atlas") == 0
    for target in (["baskets", *small], ["audit", *small, f"AUDIT={concepts}"]):
        dry = subprocess.run(["make", "--no-print-directory", "-n", *target, *args], cwd=tree,
                             capture_output=True, text=True, timeout=300)
        assert dry.returncode == 0 and ".py" not in dry.stdout, dry.stdout  # nothing left to do

    index = (site / "index.html").read_text()
    for page in ("baskets.html", "audit/index.html", "compare/u.html"):
        assert f'href="{page}"' in index and (site / page).is_file(), page
    basket = read_baskets(folder / "11_baskets.csv")[0]
    member = (site / "neurons" / basket.layer / f"{basket.members[0]}.html").read_text()
    assert f'baskets.html#b-{basket.layer}-{basket.number}"' in member
    summary = read_audit_summary(folder / "13_audit" / "summary.csv")[0]
    relevant = [a for a in read_audit(folder / "13_audit" / "audit.csv")
                if a.rank <= summary.top and a.relevance > 0]
    assert relevant
    for a in relevant:
        page = (site / "neurons" / a.layer / f"{a.channel}.html").read_text()
        audit = page[page.index("<h2>Audit</h2>"):]
        assert f"audit-{a.label}" in audit.split("</tr>")[1]
        assert f'audit/{safe_name(a.class_name, "class")}/report.html"' in audit
    # Run u is a copy of t: every neuron's best match is itself, on u's own atlas page.
    page = (site / "neurons" / "relu1" / "2.html").read_text()
    assert 'href="../../../../u/atlas/neurons/relu1/2.html"' in page
    assert broken_links(site) == []
    # In a browser, each link lands where it says (the rest of the test runs without one).
    try:
        driver = headless_chromium()
    except NoBrowser as err:
        driver, missing = None, str(err)
    if driver is not None:
        from selenium.webdriver.common.by import By
        a = relevant[0]
        try:
            for layer, channel, link, landing in (
                    (basket.layer, basket.members[0], f"#b-{basket.layer}-{basket.number}", None),
                    (a.layer, a.channel, f"#{safe_name(a.class_name, 'class')}", None),
                    ("relu1", 2, "u/atlas/neurons/relu1/2.html", "relu1 · neuron 2")):
                driver.get((site / "neurons" / layer / f"{channel}.html").resolve().as_uri())
                driver.find_element(By.CSS_SELECTOR, f'a[href$="{link}"]').click()
                assert driver.current_url.endswith(link)
                if landing is None:  # an anchor of a report page
                    assert driver.find_element(By.ID, link[1:]).is_displayed()
                else:
                    assert landing in driver.find_element(By.TAG_NAME, "h1").text
        finally:
            driver.quit()

    # A new 09 of run u: the comparison no longer matches it.
    write_scores(data / "u", seed=2)
    assert quiet(tree, args, "atlas") == 1
    make(tree, args, "atlas")
    index = (site / "index.html").read_text()
    assert 'href="compare/u.html"' not in index and "09_score of u" in index
    assert "make compare RUN=t OTHER=u" in index
    assert 'href="baskets.html"' in index and 'href="audit/index.html"' in index
    assert "Best match" not in (site / "neurons" / "relu1" / "2.html").read_text()
    assert not (site / "compare").exists() and broken_links(site) == []
    if driver is None:
        pytest.skip(f"links not followed in a browser: {missing}")


def test_labels_show_on_cards_neuron_and_layer_pages(run, tmp_path):
    """Without 15's files the atlas has no trace of labels; `make label` (a list with a planted
    concept no sentence names, and one written as markup) ends with the atlas, which shows each
    labelled neuron's label on its card and page (escaped), and the planted concept among each
    layer's missing ones on the layer page and labels.html; every link resolves."""
    tree, args, run_dir = run
    data = tmp_path / "data"
    shutil.copytree(run_dir.parent / "t", data / "t", symlinks=True)  # copy2: times kept
    args = [a if not a.startswith("DATA=") else f"DATA={data}" for a in args]
    folder, site = data / "t", data / "t" / "atlas"
    assert "labels.html" not in (site / "index.html").read_text()
    assert "Concept label" not in (site / "neurons" / "relu1" / "0.html").read_text()
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("<i>red</i> blobs\nvertical edges\na brass xylophone\n", encoding="utf-8")
    make(tree, [*args, f"CONCEPTS={concepts}"], "label")
    labels = read_labels(folder / "15_labels.csv")
    labelled = [r for r in labels if r.labelled]
    assert labelled and {r.layer for r in labels} == {"relu1", "conv2"}
    for r in labels:
        page = (site / "neurons" / r.layer / f"{r.channel}.html").read_text()
        section = page[page.index("<h2>Concept label</h2>"):]
        assert "<i>red</i>" not in section
        assert html.escape(r.label if r.labelled else r.concept, quote=False) in section
        data_js = (site / "data" / f"{r.layer}.js").read_text()
        assert (f'"lb":{json_for_script(r.label)}' in data_js) == bool(r.labelled)
    missing = {(r.layer, r.concept) for r in read_label_concepts(folder / "15_concepts.csv")
               if r.missing}
    assert {("relu1", "a brass xylophone"), ("conv2", "a brass xylophone")} <= missing
    for layer in ("relu1", "conv2"):
        page = (site / "layers" / f"{layer}.html").read_text()
        assert "a brass xylophone" in page[page.index('id="labels"'):]
    index = (site / "index.html").read_text()
    assert 'href="labels.html"' in index and "a brass xylophone" in (site / "labels.html").read_text()
    assert broken_links(site) == []


# ----------------------------------------------------------------------------------------------
# The server


def get_json(url: str, data: bytes | None = None) -> tuple[int, dict]:
    """Status and JSON body of a GET (or POST with ``data``)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_server_answers_text_and_image_queries(run):
    """07's serve() serves the atlas and answers its search over HTTP: text, an uploaded image,
    and bad input."""
    import io

    from PIL import Image
    _, _, run_dir = run
    ready = threading.Event()
    holder = {}

    def started(server):
        """Keep the listening server and let the test go on."""
        holder["server"] = server
        ready.set()

    thread = threading.Thread(target=load_stage("07_search").serve, kwargs={
        "run_dir": run_dir, "port": 0, "device": "cpu", "started": started}, daemon=True)
    thread.start()
    assert ready.wait(120)
    server = holder["server"]
    host = f"http://127.0.0.1:{server.server_address[1]}"
    base = f"{host}/{run_dir.name}/atlas/"
    try:
        with urllib.request.urlopen(host + "/", timeout=30) as resp:  # / redirects to the atlas
            assert resp.geturl() == base and b"neuron atlas" in resp.read()
        # The run's own files are reachable by the atlas's relative links, as from disk.
        with urllib.request.urlopen(base + "../01_extract.meta.json", timeout=30) as resp:
            assert json.loads(resp.read())
        status, body = get_json(base + "api/status")
        assert status == 200 and body["text"] is True
        status, body = get_json(base + "api/search?q=red&k=3")
        assert status == 200 and 1 <= len(body["hits"]) <= 3
        scores = [h["score"] for h in body["hits"]]
        assert scores == sorted(scores, reverse=True)
        assert {h["layer"] for h in body["hits"]} <= {"relu1", "conv2"}
        assert get_json(base + "api/status")[1]["image"]  # 04 used the reference CNN, here too
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (230, 20, 20)).save(buf, format="PNG")
        status, body = get_json(base + "api/search-image?k=2", buf.getvalue())
        assert status == 200 and len(body["hits"]) == 2
        status, body = get_json(base + "api/search-image", b"not an image")
        assert status == 400 and "error" in body
        status, body = get_json(base + "api/search?q=")
        assert status == 400
    finally:
        server.shutdown()
        thread.join(30)


# ----------------------------------------------------------------------------------------------
# In a real browser


def chromium():
    """A headless Chromium, or a skip saying what is missing."""
    try:
        return headless_chromium()
    except NoBrowser as err:
        pytest.skip(str(err))


def no_alert_ran(driver) -> bool:
    """True when no alert() opened and no injected <img src=x> exists."""
    from selenium.common.exceptions import NoAlertPresentException
    try:
        driver.switch_to.alert
        return False
    except NoAlertPresentException:
        pass
    return driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0


def test_browser_walk_through_the_atlas(run):
    """Sort and filter a layer, follow a neighbour, hover the map, search via `make serve` (by
    meaning, from the top bar's box, in one layer, and a query with no good match)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    tree, args, run_dir = run
    site = (run_dir / "atlas").resolve()
    driver = chromium()
    server = None
    try:
        driver.get((site / "layers" / "relu1.html").as_uri())
        wait_ready(driver)
        cards = lambda: driver.find_elements(By.CSS_SELECTOR, "#cards .card")  # noqa: E731
        assert [c.get_attribute("data-channel") for c in cards()] == ["0", "1", "2", "3"]
        texts = [c.find_element(By.CSS_SELECTOR, ".desc").text for c in cards()]
        assert texts[0] == SCRIPT and texts[1] == ATTRIBUTE  # shown as text, not run
        assert no_alert_ran(driver)
        Select(driver.find_element(By.ID, "sort")).select_by_value("clarity")
        assert [c.get_attribute("data-channel") for c in cards()] == ["0", "1", "2", "3"]
        Select(driver.find_element(By.ID, "order")).select_by_value("asc")
        assert [c.get_attribute("data-channel") for c in cards()] == ["3", "2", "1", "0"]
        driver.find_element(By.ID, "filter").send_keys("vertical edges")
        assert [c.get_attribute("data-channel") for c in cards()] == ["1"]
        assert "1 of 4" in driver.find_element(By.ID, "count").text

        driver.get((site / "neurons" / "relu1" / "0.html").as_uri())
        assert driver.find_element(By.ID, "description").text == SCRIPT
        assert SUB_EVIL in driver.find_element(By.TAG_NAME, "body").text
        assert no_alert_ran(driver)
        link = driver.find_element(By.CSS_SELECTOR, "a.mini")
        target = link.get_attribute("href")
        link.click()
        assert driver.current_url == target and "/neurons/" in target

        driver.get((site / "maps" / "relu1.html").as_uri())
        wait_ready(driver)
        point = driver.find_elements(By.CSS_SELECTOR, ".scatterlayer .point")[0]
        ActionChains(driver).move_to_element(point).perform()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "hover").is_displayed())
        shown = driver.find_element(By.CSS_SELECTOR, "#hover .desc").text
        described = {r["description"] for r in read_csv(run_dir / "03_descriptions.csv")
                     if r["layer"] == "relu1"}
        assert shown in described
        assert no_alert_ran(driver)

        server = subprocess.Popen(["make", "--no-print-directory", "serve", *args, "PORT=0"],
                                  cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, start_new_session=True)
        lines = []
        while not lines or not lines[-1].startswith("serving the atlas at"):
            lines.append(server.stdout.readline())
            assert lines[-1] and len(lines) < 20, lines  # make echoes its command first
        url = lines[-1].split(" at ")[1].split()[0]
        driver.get(url + "search.html")
        wait_ready(driver)
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "live").is_displayed())
        driver.find_element(By.ID, "q").send_keys("red")
        driver.find_element(By.ID, "semantic").click()
        WebDriverWait(driver, 60).until(
            lambda d: "by meaning" in d.find_element(By.ID, "count").text)
        assert cards() and all("match" in c.text for c in cards())
        assert no_alert_ran(driver)
        # The top bar's box searches by meaning at once, in the layer asked for; a query nothing
        # matches well says so, its hits faded as weak.
        driver.get(url + "search.html?q=red&layer=conv2")
        WebDriverWait(driver, 60).until(
            lambda d: "by meaning" in d.find_element(By.ID, "count").text)
        assert cards() and {c.get_attribute("data-layer") for c in cards()} == {"conv2"}
        driver.find_element(By.ID, "q").clear()
        driver.find_element(By.ID, "q").send_keys("a violin concert in a cathedral")
        Select(driver.find_element(By.ID, "layer")).select_by_value("")
        driver.find_element(By.ID, "semantic").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "no-match").is_displayed())
        assert "No good match" in driver.find_element(By.ID, "no-match").text
        assert cards() and all("weak" in c.get_attribute("class") for c in cards())
    finally:
        driver.quit()
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)


def test_browser_verdict_disclosure_and_glossary_at_two_widths(run, tmp_path):
    """At 1440 and 390 px: a neuron page shows its verdict first and the raw scores only once
    the disclosure is opened; "How this is judged" lands on the rule; no page is wider than the
    window; the layer's sort menu and card chips carry plain names with tooltips. Screenshots
    go to tmp_path (and to $ATLAS_SCREENSHOTS when set, to look at)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    _, _, run_dir = run
    site = (run_dir / "atlas").resolve()
    shots = Path(os.environ.get("ATLAS_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    driver = chromium()
    width = "return [document.documentElement.scrollWidth, window.innerWidth]"
    try:
        for w, h in ((1440, 900), (390, 844)):
            driver.set_window_size(w, h)
            driver.get((site / "neurons" / "relu1" / "0.html").as_uri())
            verdict = driver.find_element(By.ID, "verdict")
            assert verdict.is_displayed() and verdict.text.startswith("Described reliably")
            mosaic = driver.find_element(By.ID, "mosaic")
            assert verdict.location["y"] < mosaic.location["y"]
            assert "red blobs" not in verdict.text and "vertical edges" in verdict.text  # #1's
            raw = driver.find_element(By.CSS_SELECTOR, "#scores table")
            assert not raw.is_displayed()
            driver.save_screenshot(str(shots / f"neuron_{w}.png"))
            driver.find_element(By.CSS_SELECTOR, "#scores summary").click()
            assert raw.is_displayed()
            scroll, inner = driver.execute_script(width)
            assert scroll <= inner, (w, scroll)
            assert no_alert_ran(driver)
            link = verdict.find_element(By.LINK_TEXT, "How this is judged")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)
            link.click()  # (scrolled clear of the sticky top bar first)
            assert driver.current_url.endswith("glossary.html#margin")
            rule = driver.find_element(By.ID, "margin")
            assert rule.is_displayed() and "Described reliably" not in rule.text
            assert "described reliably when the whole interval is above 0" in rule.text
            scroll, inner = driver.execute_script(width)
            assert scroll <= inner, (w, scroll)
            driver.save_screenshot(str(shots / f"glossary_{w}.png"))
        driver.get((site / "layers" / "relu1.html").as_uri())
        wait_ready(driver)
        option = driver.find_element(By.CSS_SELECTOR, '#sort option[value="verify_corr"]')
        assert option.text == "verified r" and option.get_attribute("title") == \
            TERMS["verify_corr"].tip
        Select(driver.find_element(By.ID, "sort")).select_by_value("dnr_score")
        chips = driver.find_elements(By.CSS_SELECTOR, "#cards .card .score")
        titled = {c.text.split(" ")[0]: c.get_attribute("title") for c in chips}
        assert titled["top-20"] == f"top-20 strength: {TERMS['dnr_score'].tip}"
        assert titled["top"] == f"top activation: {TERMS['top_activation'].tip}"
    finally:
        driver.quit()


def test_browser_layer_page_sorts_by_trust_with_presets_and_filters_kept_in_the_url(run):
    """A scored layer lists its neurons in the trust order (relu1: #0 reliable, #1 weak, #2 by
    chance, #3 dead); each preset gives its list; "beats its control" and a score threshold
    filter; the sort menu has plain names; the state is in the URL, and a reload keeps it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    _, _, run_dir = run
    site = (run_dir / "atlas").resolve()
    data = json.loads((site / "data" / "relu1.js").read_text().split("] = ", 1)[1].rstrip(";\n"))
    assert [n["s"]["trust"] for n in data["neurons"]] == [1, 2, 3, 4]
    assert data["columns"][:2] == ["trust", "margin"] and data["terms"]["trust"]["n"] == \
        "trust order"
    assert [n["v"] for n in data["neurons"]] == ["r", "w", "c", "r"]  # #3: reliable, but dead
    driver = chromium()
    cards = lambda: [c.get_attribute("data-channel")  # noqa: E731
                     for c in driver.find_elements(By.CSS_SELECTOR, "#cards .card")]
    url = (site / "layers" / "relu1.html").as_uri()
    try:
        driver.get(url)
        wait_ready(driver)
        assert cards() == ["0", "1", "2", "3"]
        assert driver.find_element(By.CSS_SELECTOR, "#sort option").text == "trust order"
        names = [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#sort option")]
        assert "selectivity" in names and "verified r" in names and "verify_corr" not in names
        preset = Select(driver.find_element(By.ID, "preset"))
        expected = {"selective": ["2", "1", "0"], "polysemantic": ["2", "1", "0"],
                    "weak": ["3", "2", "1"], "reliable": ["0"], "trust": ["0", "1", "2", "3"]}
        for name, channels in expected.items():
            preset.select_by_value(name)
            assert cards() == channels, name
            assert driver.current_url.endswith(f"#preset={name}")
        Select(driver.find_element(By.ID, "sort")).select_by_value("selectivity")
        assert preset.first_selected_option.get_attribute("value") == ""  # own choice
        assert cards() == ["3", "2", "1", "0"]
        driver.find_element(By.ID, "beats").click()  # #2 loses to its control
        assert cards() == ["3", "1", "0"]
        Select(driver.find_element(By.ID, "tcol")).select_by_value("clarity")
        driver.find_element(By.ID, "tmin").send_keys("0.6")  # clarity 0.9 − 0.2 × channel
        assert cards() == ["1", "0"]
        state = driver.current_url.split("#", 1)[1]
        assert "sort=selectivity" in state and "beats=1" in state and "t=clarity" in state
        driver.get("about:blank")
        driver.get(f"{url}#{state}")  # a link with the state shows the same list
        wait_ready(driver)
        assert cards() == ["1", "0"] and driver.find_element(By.ID, "beats").is_selected()
        driver.get(f"{url}#preset=weak")  # the same page: its fragment alone changes
        WebDriverWait(driver, 10).until(lambda d: cards() == ["3", "2", "1"])
        assert no_alert_ran(driver)
    finally:
        driver.quit()


def test_browser_z_grid_names_the_channel_under_the_pointer(run):
    """On a pair's page, a real pointer over a z cell names its layer, channel and z below the
    grid (its tooltip says the same), and a click opens that neuron's page."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    _, _, run_dir = run
    pair = next((run_dir / "atlas" / "debug").glob("*/index.html"))
    driver = chromium()
    try:
        driver.set_window_size(1440, 900)
        driver.get(pair.as_uri())
        wait_ready(driver)
        cells = driver.find_elements(By.CSS_SELECTOR, ".zgrid a")
        assert len(cells) == 6
        readout = driver.find_element(By.ID, "zreadout")
        assert readout.text == ""
        ActionChains(driver).move_to_element(cells[1]).perform()
        assert readout.text.startswith("conv2 · channel 1 · z = ")
        assert cells[1].get_attribute("title") == readout.text
        ActionChains(driver).move_to_element(cells[3]).perform()
        assert readout.text.startswith("relu1 · channel 1 · z = ")
        cells[3].click()
        assert driver.current_url.endswith("/neurons/relu1/1.html")
        assert no_alert_ran(driver)
    finally:
        driver.quit()


def test_browser_a_tile_opens_its_image_activation_and_label(run):
    """A click on a neuron page's tile opens the lightbox with that tile's image, activation,
    label and prediction, with the overlay drawn; the arrow steps to the next tile; the page
    is no wider than the window with the lightbox open, at 1440 and 390 px."""
    from selenium.webdriver.common.by import By
    _, _, run_dir = run
    site = (run_dir / "atlas").resolve()
    data = atlas.read_run(run_dir)
    names = atlas.class_names(data)
    page = site / "neurons" / "relu1" / "1.html"
    tiles = page_tiles(page)["tiles"]
    assert len(tiles) >= 2

    def expected(k: int) -> tuple[int, float, str, str]:
        """Image id, activation, label and prediction of tile ``k`` from the run's files."""
        i, value = tiles[k][0], tiles[k][1]
        row = data.predictions[i]
        idx = int(row["label_idx"])
        label = (names.get(idx, row["label"]) if idx >= 0 else row["label"]) or "none"
        return i, value, label, row["pred_name"]

    driver = chromium()
    try:
        for w, h in ((1440, 900), (390, 844)):
            driver.set_window_size(w, h)
            driver.get(page.as_uri())
            wait_ready(driver)
            buttons = driver.find_elements(By.CSS_SELECTOR, "#mosaic .tile")
            assert len(buttons) == len(tiles)
            assert not driver.find_element(By.ID, "lightbox").is_displayed()
            for k in (1, 2):
                if k == 1:
                    buttons[k].click()
                else:
                    driver.find_element(By.ID, "lb-next").click()
                i, value, label, pred = expected(k)
                assert driver.find_element(By.ID, "lightbox").is_displayed()
                src = driver.find_element(By.ID, "lb-image").get_attribute("src")
                assert src.endswith(f"/images/{i}.webp"), src
                shown = float(driver.find_element(By.ID, "lb-value").text)
                assert shown == pytest.approx(value, rel=5e-3, abs=1e-3)
                assert driver.find_element(By.ID, "lb-label").text == label
                assert driver.find_element(By.ID, "lb-pred").text.startswith(pred)
                assert driver.execute_script(
                    "return document.getElementById('lb-image').naturalWidth") > 0
                assert driver.execute_script(
                    "return document.getElementById('lb-overlay').width") > 0
            scroll, inner = driver.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth]")
            assert scroll <= inner, (w, scroll)
            driver.find_element(By.ID, "lb-close").click()
            assert not driver.find_element(By.ID, "lightbox").is_displayed()
    finally:
        driver.quit()


PAGES = ["index.html", "layers/relu1.html", "maps/relu1.html", "neurons/relu1/0.html",
         "sankey.html", "search.html", "glossary.html", "debug/index.html"]


def test_browser_maps_no_default_ring_legend_sorted_clear_of_toolbar_no_wide_page(run, tmp_path):
    """A map rings a neuron only when one is asked for (#c=2), lists its clusters in order, and
    plotly's toolbar does not cover the legend; no page type is wider than the window at 1440
    or 390 px; the atlas copied elsewhere has every link and picture (self-contained)."""
    from selenium.webdriver.common.by import By
    _, _, run_dir = run
    copy = tmp_path / "elsewhere" / "atlas"
    shutil.copytree(run_dir / "atlas", copy)  # the run folder is not beside it any more
    assert broken_links(copy) == []
    pair = next((copy / "debug").glob("*/index.html"))
    pages = PAGES + [str(pair.relative_to(copy)), str((pair.parent / "report.html").relative_to(copy)),
                     str(next(pair.parent.glob("[0-9]*.html")).relative_to(copy))]
    driver = chromium()
    width = "return [document.documentElement.scrollWidth, window.innerWidth]"
    overlap = """const a = document.querySelector('#map .modebar').getBoundingClientRect(),
                       b = document.querySelector('#map g.legend').getBoundingClientRect();
                 return !(a.right <= b.left || b.right <= a.left || a.bottom <= b.top ||
                          b.bottom <= a.top);"""
    try:
        for w, h in ((1440, 900), (390, 844)):
            driver.set_window_size(w, h)
            for page in pages:
                driver.get((copy / page).as_uri())
                wait_ready(driver)
                scroll, inner = driver.execute_script(width)
                assert scroll <= inner, (w, page, scroll)
                if page.startswith("layers/"):
                    # a score's full name can be long (a debugged pair of long class names):
                    # the menus holding it must not widen the page either
                    driver.execute_script(
                        "for (const id of ['sort', 'tcol']) { const o = document.createElement("
                        "'option'); o.text = 'relevance to the wrong class, ' + 'x'.repeat(70);"
                        " document.getElementById(id).append(o); }")
                    scroll, inner = driver.execute_script(width)
                    assert scroll <= inner, (w, page, "long menu choice", scroll)
                broken = driver.execute_script(
                    "return Array.from(document.images).filter(i => i.getAttribute('src') && "
                    "i.complete && i.naturalWidth === 0).map(i => i.src)")
                assert broken == [], (page, broken)
            driver.get((copy / "maps" / "relu1.html").as_uri())
            wait_ready(driver)
            names = driver.execute_script(
                "return document.getElementById('map').data.map(t => t.name)")
            assert not any(n.startswith("neuron") for n in names)  # no ring without #c
            clusters = [int(re.match(r"cluster (\d+)", n).group(1)) for n in names
                        if n.startswith("cluster")]
            assert clusters == sorted(clusters) and len(clusters) >= 2
            legend = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#map .legendtext")]
            assert legend[:len(clusters)] == [n.strip() for n in names[:len(clusters)]]
            assert driver.execute_script(overlap) is False, w
        driver.get("about:blank")  # (a neuron page's link loads the map afresh)
        driver.get((copy / "maps" / "relu1.html").as_uri() + "#c=2")
        wait_ready(driver)
        assert driver.execute_script(
            "return document.getElementById('map').data.map(t => t.name)")[-1] == "neuron 2"
    finally:
        driver.quit()


def test_browser_map_draws_neurons_with_one_sentence_as_one_larger_point(run, tmp_path):
    """05 gives neurons with the same sentence the same point. The map draws such a point once,
    larger (area ∝ neurons, 9 px alone), its hover names the other neurons, and a click opens the
    layer's cards filtered to the sentence; a point of its own still opens its neuron."""
    from urllib.parse import parse_qs, urlsplit

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    _, _, run_dir = run
    copy = tmp_path / "atlas"
    shutil.copytree(run_dir / "atlas", copy)
    # three neurons of relu1 given neuron 0's sentence, cluster and point, as 05 would
    data = copy / "data" / "relu1.js"
    data.write_text(data.read_text() + """
(function () { const ns = window.ATLAS_DATA["relu1"].neurons, a = ns[0];
  [1, 2].forEach(function (i) { Object.assign(ns[i], { x: a.x, y: a.y, d: a.d, cl: a.cl }); }); })();
""")
    neurons = len(re.findall(r'"c": ?\d+', data.read_text()))
    driver = chromium()
    try:
        driver.set_window_size(1200, 900)
        driver.get((copy / "maps" / "relu1.html").as_uri())
        wait_ready(driver)
        traces = driver.execute_script(
            "return document.getElementById('map').data.map(t => [t.customdata, t.marker.size])")
        channels = [c for ids, _ in traces for c in ids]
        sizes = dict(zip(channels, [z for _, zs in traces for z in zs]))
        assert sorted(channels) == [0] + list(range(3, neurons))  # 1 and 2 drawn under 0
        assert sizes[0] == pytest.approx(9 * 3 ** 0.5) and sizes[3] == pytest.approx(9)
        point = driver.execute_script("""
            const gd = document.getElementById('map'), fl = gd._fullLayout;
            const t = gd.data.findIndex(t => t.customdata.includes(0)), i = gd.data[t].customdata.indexOf(0);
            const r = gd.getBoundingClientRect();
            return [r.left + fl.margin.l + fl.xaxis.l2p(gd.data[t].x[i]),
                    r.top + fl.margin.t + fl.yaxis.l2p(gd.data[t].y[i])];""")
        body = driver.find_element(By.TAG_NAME, "body")
        ActionChains(driver).move_to_element_with_offset(
            body, point[0] - body.rect["width"] / 2, point[1] - body.rect["height"] / 2).perform()
        hover = driver.find_element(By.ID, "hover")
        assert hover.is_displayed() and "#0" in hover.text
        assert "and 2 more neurons with this sentence: #1, #2" in hover.text
        sentence = driver.execute_script("return window.ATLAS_DATA['relu1'].neurons[0].d")
        ActionChains(driver).click().perform()
        WebDriverWait(driver, 10).until(lambda d: "/layers/" in d.current_url)
        url = urlsplit(driver.current_url)
        assert url.path.endswith("/layers/relu1.html") and parse_qs(url.fragment)["q"] == [sentence]
        wait_ready(driver)
        shown = driver.find_elements(By.CSS_SELECTOR, "a.card")
        assert len(shown) >= 3
    finally:
        driver.quit()


def test_labels_show_by_class_name_even_when_never_predicted():
    """A label mapped to a class (a WordNet id → index 2) that the model never predicts shows by
    01's class name, not as the dataset wrote it; an unmapped label keeps its own text."""
    from types import SimpleNamespace
    predictions = {
        0: {"label": "n00000002", "label_idx": 2, "pred_idx": 0, "pred_name": "zero"},
        1: {"label": "n00000002", "label_idx": 2, "pred_idx": 1, "pred_name": "one"},
        2: {"label": "odd", "label_idx": -1, "pred_idx": 1, "pred_name": "one"},
        3: {"label": "", "label_idx": -1, "pred_idx": 0, "pred_name": "zero"},
    }
    run = SimpleNamespace(extract_meta={"classes": ["zero", "one", "two"]},
                          predictions=predictions,
                          topk={"L": SimpleNamespace(image_ids=np.array([[0, 1, 2, 3, -1]]))})
    counts = atlas.top_classes(run, atlas.class_names(run), "L", 0)
    assert counts["label_counts"] == [("two", 2), ("odd", 1)]
    assert counts["unlabelled"] == 1 and counts["topk"] == 4
    assert dict(counts["pred_counts"]) == {"zero": 2, "one": 2}


# ----------------------------------------------------------------------------------------------
# Neighbours by connection and the trace page (issue 23, points 4 and 5)


def test_neighbours_sharing_a_sentence_make_one_line():
    """Three neighbours with one sentence become one line "3 neurons: …"; the others stay tiles,
    best first."""
    tiles = [{"layer": "a", "channel": c, "description": d, "url": f"{c}.html", "sim": s}
             for c, d, s in ((1, "mostly espresso", 0.99), (2, "a red cup", 0.98),
                             (3, "mostly espresso", 0.97), (4, "mostly espresso ", 0.96),
                             (5, "a dog", 0.5))]
    singles, shared = atlas.by_sentence(tiles)
    assert [m["channel"] for m in singles] == [2, 5]
    assert [(line["sentence"], [m["channel"] for m in line["neurons"]]) for line in shared] == \
        [("mostly espresso", [1, 3, 4])]


def test_neuron_pages_list_their_planted_connections(run):
    """The fake model wires conv2's channel 0 to relu1's red channel 0 alone (conv2 = 1×1 conv of
    the pooled relu1, weights by hand): conv2 #0's page lists relu1 #0 as its strongest input,
    relu1 #0's lists conv2 #0 as its strongest output, and relu1 #3 (brightness, weight 0 into
    conv2) has no output listed. 06_connections.npz holds the measure, on the fixture's images."""
    from common.artefacts import read_connections, read_images
    _, _, run_dir = run
    wiring = read_connections(run_dir / "06_connections.npz")
    usable = sum(r.status == "ok" for r in read_images(run_dir / "01_images.csv"))
    sample = load_stage("06_trace").Settings().connect_images  # CONNECT_IMAGES's default
    assert wiring.layers == ["relu1", "conv2"] and wiring.n_images == min(usable, sample) > 0
    matrix = wiring.to_next["relu1"]
    assert matrix[0, 0] > 0 and matrix[0, 1] == 0 and not matrix[3].any()

    def section(layer: str, channel: int) -> str:
        """The "Strongest connections" part of a neuron page."""
        page = (run_dir / "atlas" / "neurons" / layer / f"{channel}.html").read_text()
        return page[page.index('id="connections"'):page.index("<h2>Debugging")]

    inputs = section("conv2", 0)
    assert "inputs from the layer before (relu1)" in inputs
    first = re.search(r'<a class="mini" href="[^"]*neurons/(\w+)/(\d+)\.html"', inputs)
    assert first.groups() == ("relu1", "0")
    outputs = section("relu1", 0)
    first = re.search(r'<a class="mini" href="[^"]*neurons/(\w+)/(\d+)\.html"', outputs)
    assert first.groups() == ("conv2", "0")
    assert "outputs to the layer after" not in section("relu1", 3)


def test_browser_trace_page_columns_every_cluster_switch_and_click(run, tmp_path):
    """At 1440 and 390 px the trace page draws every cluster of 05 in its layer's column, the
    layers named above their columns in depth order; the switch to the trace by connections
    keeps every cluster; a real pointer click on a cluster opens its layer page at the cluster.
    Screenshots go to tmp_path (and to $ATLAS_SCREENSHOTS when set)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    _, _, run_dir = run
    site = (run_dir / "atlas").resolve()
    clusters = read_csv(run_dir / "05_clusters.csv")
    kind = json.loads((run_dir / "06_trace.meta.json").read_text())["args"]["kind"]
    expected = len({(r["layer"], r["cluster"]) for r in clusters if r["kind"] == kind})
    shots = Path(os.environ.get("ATLAS_SCREENSHOTS", tmp_path))
    driver = chromium()
    try:
        for width, height in ((1440, 900), (390, 844)):
            driver.set_window_size(width, height)
            driver.get((site / "sankey.html").as_uri())
            wait_ready(driver)
            nodes = driver.find_elements(By.CSS_SELECTOR, ".sankey-node")
            assert len(nodes) == expected
            heads = [a.text for a in driver.find_elements(By.CSS_SELECTOR, ".annotation-text")]
            assert heads == ["relu1", "conv2"]
            xs = {}
            for node in nodes:
                xs.setdefault(node.rect["x"] // 5, []).append(node)
            assert len(xs) == 2  # two columns
            assert driver.execute_script(
                "return document.documentElement.scrollWidth") <= width + 1
            driver.save_screenshot(str(shots / f"trace-sentence-{width}.png"))
            driver.find_element(By.CSS_SELECTOR, "#trace-kind input[value=connection]").click()
            WebDriverWait(driver, 10).until(lambda d: "by=connection" in d.current_url)
            assert len(driver.find_elements(By.CSS_SELECTOR, ".sankey-node")) == expected
            assert "drive" in driver.find_element(By.ID, "trace-note").text
            # CONNECT_THRESHOLD=0: every relu1 cluster is linked to conv2's by connections
            assert len(driver.find_elements(By.CSS_SELECTOR, ".sankey-link")) >= 2
            # links that random clusters match (06_trace.csv p_value > 0.05) are the faint ones
            faint = driver.execute_script(
                "return Array.from(document.querySelectorAll('.sankey-link')).filter("
                "function (l) { return parseFloat(getComputedStyle(l).fillOpacity) < 0.2"
                " && parseFloat(getComputedStyle(l).fillOpacity) > 0; }).length")
            assert faint == sum(r["kind"] == "connection" and float(r["p_value"]) > 0.05
                                for r in read_csv(run_dir / "06_trace.csv"))
            driver.save_screenshot(str(shots / f"trace-connection-{width}.png"))
        rect = driver.find_elements(By.CSS_SELECTOR, ".sankey-node rect")[0]
        ActionChains(driver).move_to_element(rect).click().perform()
        WebDriverWait(driver, 10).until(lambda d: "/layers/" in d.current_url)
        assert re.search(r"/layers/relu1\.html#(.*&)?cluster=\d", driver.current_url)
        assert no_alert_ran(driver)
    finally:
        driver.quit()
