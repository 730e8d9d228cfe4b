"""The playground page in a real browser (Debian's Chromium, headless, driven by Selenium) against the real server.

A person's path through the page: it loads and connects, a label search finds the demo's concept feature, a steered
chat renders the steered and the default answer side by side, a hovered token shows its features, the traced
feature paints a heat map, a chosen probe paints its scores under both answers with the answers' aggregates, and the
request shown as code is the one the page sent. Every figure the page shows is
checked against the server's own API answer to the same request, made separately with `requests`.

Screenshots go to $STEER_PLAYGROUND_SCREENSHOTS when set (README's images were made so), else to a temp folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from ..tools import require_tool
from .conftest import add_explanations, running_server
from .probe_checks import config_entries, make_probes

pytestmark = pytest.mark.server

PORT = 18791 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
BASE = f"http://127.0.0.1:{PORT}"
QUESTION = "Tell me about a place you would like to visit."  # the page's own example
MAX_TOKENS = 40
ADMIN_KEY = "playground-admin-key-0123456789"


EXPLANATION = {"description": "the Golden Gate Bridge and its towers", "explanationModelName": "gpt-4o-mini"}


@pytest.fixture(scope="module")
def probes(sae_layer, tmp_path_factory):
    """The test probes: `concept` (sigmoid, one label) at the SAE's layer, `early` (raw, two labels)."""
    return make_probes(tmp_path_factory.mktemp("probes"), sae_layer)


@pytest.fixture(scope="module")
def server(demo_assets, steer_config_path, sae_layer, concept, probes, tmp_path_factory):
    """The demo config, plus one Neuronpedia explanation (bulk-export layout) of the concept feature, plus the
    test probes, plus runtime loads (the admin routes, for the fit form) at the SAE's layer."""
    folder = tmp_path_factory.mktemp("playground")
    path = folder / "steer.json"
    config = json.loads(Path(steer_config_path).read_text())
    config["probes"] = config_entries(probes)
    root = tmp_path_factory.mktemp("fitted")
    config["runtime"] = {"layers": [sae_layer], "rows_per_layer": 4, "roots": [str(root)]}
    path.write_text(json.dumps(config))
    line = {"modelId": "smollm2-135m", "layer": "15-res-topk", "index": str(concept["index"]), **EXPLANATION}
    add_explanations(str(path), folder, {"batch-0.jsonl": json.dumps(line)})
    env = {**os.environ, "STEER_ADMIN_KEY": ADMIN_KEY}
    with running_server(demo_assets.model_dir, str(path), PORT, env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def concept(demo_assets) -> dict:
    """The demo's concept feature as the asset analysis recorded it, and the demo's clamp strength for it."""
    from steer_demo.concept import concept_feature

    feature = concept_feature(demo_assets)
    labels = json.loads(Path(demo_assets.labels_path).read_text())
    max_act = labels["features"][feature.index]["max_act"]
    return {"index": feature.index, "label": feature.label, "value": round(1.7 * max_act, 1)}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("STEER_PLAYGROUND_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(server):
    chromium = require_tool("chromium", "chromium")
    chromedriver = require_tool("chromedriver", "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1500,1100",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_script_timeout(30)
    try:
        driver.get(f"{BASE}/playground")
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float = 30, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message)


def send_and_wait(driver) -> None:
    """Press Send and wait for the answer: the status says "done" (an error status fails the test)."""
    driver.find_element("id", "send").click()
    wait(
        driver,
        lambda d: (
            d.find_element("id", "status").text == "done"
            or "error" in d.find_element("id", "status").get_attribute("class")
        ),
        timeout=300,
    )
    assert driver.find_element("id", "status").text == "done"


def column_tokens(driver, column: str) -> list[dict]:
    """The tokens of the column's last answer, as the page holds them: text, features, traced value, painted."""
    return driver.execute_script(
        """
        const turns = document.querySelectorAll('#' + arguments[0] + ' .turn');
        const last = turns[turns.length - 1];
        return [...last.querySelectorAll('.tok')].map((s) => ({
            text: s.textContent, features: s._features, traced: s._traced, painted: s.style.background !== '',
            special: s.classList.contains('special')}));
        """,
        column,
    )


def text_of(tokens: list[dict]) -> str:
    """The answer's text: its tokens less those shown apart (the stop token is not part of the content)."""
    return "".join(t["text"] for t in tokens if not t["special"])


def assert_same_reads(page: list[dict], api: list[dict]) -> None:
    """Per-token top features: the same features in the same order, activations equal to float rounding."""
    assert len(page) == len(api)
    for got, want in zip(page, api):
        assert set(got) == set(want)
        for sae in want:
            mine = {f["index"]: (f["activation"], f["label"]) for f in got[sae]}
            theirs = {f["index"]: (f["activation"], f["label"]) for f in want[sae]}
            for index in mine.keys() & theirs.keys():
                assert mine[index][1] == theirs[index][1]
                assert mine[index][0] == pytest.approx(theirs[index][0], rel=1e-3, abs=1e-3)
            # A feature may only swap in or out of the top K at its edge, in a near-tie.
            edge = min((a for a, _ in theirs.values()), default=0.0)
            for index in mine.keys() ^ theirs.keys():
                activation = (mine.get(index) or theirs[index])[0]
                assert activation == pytest.approx(edge, rel=1e-2, abs=1e-2), (index, mine, theirs)


def api_chat(body: dict) -> dict:
    """The same request the page sent, non-streaming, straight to the API."""
    plain = {k: v for k, v in body.items() if k != "stream"}
    reply = requests.post(f"{BASE}/v1/chat/completions", json=plain, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]


def test_page_is_served(server):
    reply = requests.get(f"{BASE}/playground", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/html")
    assert "<title>steer-plugin playground</title>" in reply.text
    assert requests.get(f"{BASE}/playground/", timeout=10).status_code == 200


def test_page_connects(browser):
    wait(
        browser,
        lambda d: d.find_element("id", "status").text.startswith("connected"),
        message="no connection",
    )
    assert browser.find_element("id", "model").get_attribute("value") == "demo"
    # The configured vector is offered.
    options = [
        o.get_attribute("value") for o in browser.find_elements("css selector", "#vector-select option")
    ]
    assert options == ["unit"]
    # The configured probes are offered, one choice per probe and label, none chosen.
    choices = [
        o.get_attribute("value") for o in browser.find_elements("css selector", "#probe-select option")
    ]
    assert choices == ["", "concept/on", "early/left", "early/right"]
    assert browser.find_element("id", "probe-select").get_attribute("value") == ""


def test_search_finds_the_concept_feature(browser, concept, shots):
    box = browser.find_element("id", "search-q")
    box.clear()
    box.send_keys(concept["label"])
    browser.find_element("id", "search-btn").click()
    hit = wait(
        browser,
        lambda d: d.find_elements("css selector", f'#search-results li[data-index="{concept["index"]}"]'),
        message="the concept feature is not among the hits",
    )[0]
    api = requests.get(
        f"{BASE}/v1/steering/features", params={"q": concept["label"], "limit": 30}, timeout=10
    ).json()
    shown = [
        int(li.get_attribute("data-index"))
        for li in browser.find_elements("css selector", "#search-results li")
    ]
    assert shown == [h["index"] for h in api["data"]]
    assert concept["label"] in hit.text
    # The feature's Neuronpedia explanation is shown beside its label, with the explainer model.
    assert f"{EXPLANATION['description']} ({EXPLANATION['explanationModelName']})" in hit.text
    browser.save_screenshot(str(shots / "playground-search.png"))


def test_steered_chat_renders_both_columns(browser, concept, shots):
    hit = browser.find_element("css selector", f'#search-results li[data-index="{concept["index"]}"]')
    hit.find_element("css selector", "button.hit-steer").click()
    row = wait(
        browser, lambda d: d.find_elements("css selector", f'#ops .op-row[data-index="{concept["index"]}"]')
    )[0]
    assert row.find_element("css selector", "select.op").get_attribute("value") == "clamp"
    value = row.find_element("css selector", "input.value-num")
    value.clear()
    value.send_keys(str(concept["value"]))
    # Adding the first feature also traces it (the heat map).
    assert browser.find_element("id", "heat-feature").text.startswith(f"tracing demo/{concept['index']}")
    tokens = browser.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(QUESTION)
    send_and_wait(browser)

    steered, default = column_tokens(browser, "steered"), column_tokens(browser, "default")
    steered_text, default_text = text_of(steered), text_of(default)
    assert not any(
        t["special"] for t in steered[:-1] + default[:-1]
    )  # only a final stop token is shown apart
    assert steered_text != default_text

    # What the page shows is what the API answers to the same requests.
    sent = browser.execute_script("return state.lastRequest")
    assert sent["steering"]["features"] == [
        {"sae": "demo", "index": concept["index"], "op": "clamp", "value": concept["value"]}
    ]
    api_steered = api_chat(sent)
    assert steered_text == api_steered["message"]["content"]
    default_body = {**sent, "steering": {"inspect": sent["steering"]["inspect"]}}
    api_default = api_chat(default_body)
    assert default_text == api_default["message"]["content"]
    unsteered = api_chat({k: v for k, v in sent.items() if k != "steering"})
    assert default_text == unsteered["message"]["content"]

    # Per-token features and the traced feature, token by token, as the API reports them.
    # (The page's two requests ran batched together, the API's alone: activations agree to float rounding.)
    assert_same_reads([t["features"] for t in steered], api_steered["steering"]["tokens"])
    assert [t["traced"] for t in steered] == pytest.approx(
        [v[0] for v in api_steered["steering"]["traced"]], rel=1e-3, abs=1e-3
    )
    assert_same_reads([t["features"] for t in default], api_default["steering"]["tokens"])
    # The heat map: the clamp holds the traced feature up on every steered token; unsteered, it fires on few.
    assert all(t["painted"] for t in steered)
    assert sum(t["painted"] for t in default) < len(default)
    assert min(t["traced"] for t in steered) > max(t["traced"] for t in default)
    browser.save_screenshot(str(shots / "playground-chat.png"))


def test_hover_shows_a_tokens_features(browser, shots):
    from selenium.webdriver.common.action_chains import ActionChains

    spans = browser.find_elements("css selector", "#steered .turn:last-child .tok")
    k = min(3, len(spans) - 1)
    ActionChains(browser).move_to_element(spans[k]).perform()
    tip = wait(
        browser,
        lambda d: d.find_element("id", "tooltip") if d.find_element("id", "tooltip").is_displayed() else None,
    )
    expected = column_tokens(browser, "steered")[k]["features"]["demo"]
    rows = tip.find_elements("css selector", "tr")
    assert [r.get_attribute("data-index") for r in rows] == [str(f["index"]) for f in expected]
    assert f"{expected[0]['activation']:.2f}" in rows[0].text
    browser.save_screenshot(str(shots / "playground-hover.png"))
    ActionChains(browser).move_by_offset(0, 300).perform()


def test_code_is_the_request_the_page_sent(browser, tmp_path):
    sent = browser.execute_script("return state.lastRequest")
    steered_text = text_of(column_tokens(browser, "steered"))
    curl = browser.find_element("id", "code-curl").get_attribute("textContent")
    assert curl.startswith(f"curl {BASE}/v1/chat/completions")
    body = json.loads(re.search(r"-d '(.*)'\s*$", curl, re.S).group(1).replace("'\\''", "'"))
    assert body == sent
    # The OpenAI-SDK snippet, run as a person would paste it, streams the steered answer.
    browser.find_element("id", "tab-python").click()
    code = browser.find_element("id", "code-python").text
    assert "extra_body" in code
    script = tmp_path / "snippet.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == steered_text


def probe_map(driver, column: str) -> dict:
    """The probe heat map under the column's last answer: its cells (text, shown score, painted alpha) and the
    summary figures shown beside it."""
    return driver.execute_script(
        """
        const turns = document.querySelectorAll('#' + arguments[0] + ' .turn');
        const map = turns[turns.length - 1].querySelector('.probe-map');
        if (!map) return null;
        const alpha = (c) => { const m = /([0-9.]+)\\)$/.exec(c.style.backgroundColor); return m ? Number(m[1]) : null; };
        return {
            shown: map.style.display !== 'none',
            name: map.querySelector('.probe-name').textContent,
            cells: [...map.querySelectorAll('.pcell')].map((c) => ({
                text: c.textContent, score: c.dataset.score === '' ? null : Number(c.dataset.score),
                alpha: alpha(c)})),
            summary: Object.fromEntries([...map.querySelectorAll('.probe-stat')].map((s) => [
                s.dataset.stat, {value: Number(s.dataset.value), text: s.textContent}])),
        };
        """,
        column,
    )


def test_probe_heat_map(browser, probes, shots):
    """A chosen probe is scored on both answers: one heat-map cell per token, each showing and painted by the
    API's score for that token, and the answer's max, mean and window max beside it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    browser.find_element("id", "clear").click()
    Select(browser.find_element("id", "probe-select")).select_by_value("concept/on")
    send_and_wait(browser)
    sent = browser.execute_script("return state.lastRequest")
    assert sent["steering"]["inspect"]["probes"] == [p.id for p in probes]  # all scored, one painted
    bodies = {"steered": sent, "default": {**sent, "steering": {"inspect": sent["steering"]["inspect"]}}}
    answers = {column: api_chat(body) for column, body in bodies.items()}

    def check(column: str, probe_id: str, label: str, sigmoid: bool) -> list[dict]:
        shown, api = probe_map(browser, column), answers[column]["steering"]
        assert shown["shown"] and shown["name"].startswith(f"probe {probe_id}/{label}")
        tokens = column_tokens(browser, column)
        # One cell per token of the answer, the same tokens, each showing the API's score for that token.
        assert len(shown["cells"]) == len(tokens) == len(api["probes"]) > 1
        assert [c["text"] for c in shown["cells"]] == [t["text"] for t in tokens]
        want = [scores[probe_id][label] for scores in api["probes"]]
        assert [c["score"] for c in shown["cells"]] == pytest.approx(want, rel=1e-3, abs=1e-3)
        # Painted by the score: a sigmoid's as is, a raw score scaled by the answer's range.
        got = [c["score"] for c in shown["cells"]]
        lo, hi = min(got), max(got)
        level = [v if sigmoid else (v - lo) / (hi - lo) for v in got]
        assert [c["alpha"] for c in shown["cells"]] == pytest.approx([0.85 * a for a in level], abs=2e-3)
        # The answer's aggregates, as the API reports them.
        summary = api["probe_summary"][probe_id][label]
        assert set(shown["summary"]) == {"max", "mean", "window_max"}
        for key, stat in shown["summary"].items():
            assert stat["value"] == pytest.approx(summary[key], rel=1e-3, abs=1e-3)
            assert f"{stat['value']:.3f}" in stat["text"]
        return shown["cells"]

    for column in ("steered", "default"):
        check(column, "concept", "on", sigmoid=True)
    # Switching the probe repaints the answers without asking again.
    Select(browser.find_element("id", "probe-select")).select_by_value("early/right")
    for column in ("steered", "default"):
        cells = check(column, "early", "right", sigmoid=False)
    assert browser.execute_script("return state.lastRequest") == sent

    # Hovering a cell shows the token's scores of every probe, the painted one marked.
    k = min(2, len(cells) - 1)
    cell = browser.find_elements("css selector", "#default .turn:last-child .pcell")[k]
    ActionChains(browser).move_to_element(cell).perform()
    tip = wait(
        browser,
        lambda d: d.find_element("id", "tooltip") if d.find_element("id", "tooltip").is_displayed() else None,
    )
    lines = tip.find_elements("css selector", ".probe-score")
    assert [(x.get_attribute("data-probe"), x.get_attribute("data-label")) for x in lines] == [
        ("concept", "on"), ("early", "left"), ("early", "right")
    ]  # fmt: skip
    chosen = tip.find_elements("css selector", ".probe-score.chosen")
    assert len(chosen) == 1 and chosen[0].text.endswith(f"{cells[k]['score']:.3f}")
    browser.save_screenshot(str(shots / "playground-probes.png"))
    ActionChains(browser).move_by_offset(0, 300).perform()


def submit_fit(driver) -> None:
    """Click Fit and wait until the form has shown that it is fitting (a spinner) and then the answer."""
    driver.execute_script(
        """
        window.sawSpinner = false;
        new MutationObserver(() => { if (document.querySelector('#fit-status .spinner')) window.sawSpinner = true; })
            .observe(document.getElementById('fit-status'), {childList: true, subtree: true});
        """
    )
    driver.find_element("id", "fit-submit").click()
    wait(
        driver,
        lambda d: d.execute_script("return window.sawSpinner"),
        timeout=30,
        message="no progress shown",
    )
    wait(
        driver,
        lambda d: (
            not d.find_elements("css selector", "#fit-status .spinner")
            and d.find_element("id", "fit-submit").is_enabled()
        ),
        timeout=600,
        message="the fit did not end",
    )


def fit_form(driver, kind: str, fid: str, layer: int, positive: list[str], negative: list[str], names=None):
    """Fill the fit form as a person would (the panel opened, the admin key typed) and submit it; wait for the
    answer: the status line (its text, whether an error) and the shown result's figures."""
    from selenium.webdriver.support.ui import Select

    panel = driver.find_element("id", "fit-panel")
    if panel.get_attribute("open") is None:
        panel.find_element("css selector", "summary").click()
    key = driver.find_element("id", "fit-admin-key")
    key.clear()
    key.send_keys(ADMIN_KEY)
    Select(driver.find_element("id", "fit-kind")).select_by_value(kind)
    fields = {"fit-id": fid, "fit-layer": str(layer), "fit-positive": "\n".join(positive)}
    fields["fit-negative"] = "\n".join(negative)
    if names:
        fields["fit-pos-name"], fields["fit-neg-name"] = names
    for field, value in fields.items():
        box = driver.find_element("id", field)
        box.clear()
        if value:
            box.send_keys(value)
    submit_fit(driver)
    status = driver.find_element("id", "fit-status")
    shown = {
        s.get_attribute("data-stat"): (float(s.get_attribute("data-value")), s.text)
        for s in driver.find_elements("css selector", "#fit-result .fit-stat")
    }
    return status.text, "error" in status.get_attribute("class"), shown


def admin_post(path: str, body: dict) -> requests.Response:
    return requests.post(f"{BASE}{path}", json=body, headers={"X-Steer-Admin-Key": ADMIN_KEY}, timeout=900)


def test_fit_a_probe_in_the_page_and_paint_it(browser, sae_layer, shots):
    """The fit form fits a probe from labelled demo-corpus texts (the bridge prompts against other topics): the
    page shows the AUROC and accuracy the API answers to the same body, the probe is registered and offered in
    the picker at once, and painted under the next answers with the API's scores."""
    from selenium.webdriver.support.ui import Select

    from steer_demo.prompts import BRIDGE_PROMPTS, OTHER_PROMPTS

    bridge, others = BRIDGE_PROMPTS[:16], [p for _, p in OTHER_PROMPTS][::6][:16]
    text, error, shown = fit_form(
        browser, "probe", "bridge_fit", sae_layer, bridge, others, ("bridge", "other")
    )
    assert not error, text
    sent = browser.execute_script("return state.lastFitRequest")
    assert sent["kind"] == "probe"
    examples = [{"text": t, "label": "bridge"} for t in bridge] + [
        {"text": t, "label": "other"} for t in others
    ]
    assert sent["body"] == {
        "id": "bridge_fit", "layer": sae_layer, "pooling": "mean", "examples": examples,
        "labels": ["other", "bridge"], "held_out": 0.25,
    }  # fmt: skip
    # The API's answer to the same body (under another id: the split is seeded, so the same fit).
    api = admin_post("/v1/steering/probes:fit", {**sent["body"], "id": "bridge_api"})
    assert api.status_code == 201, api.text
    fit = api.json()
    assert set(shown) == {"auroc", "accuracy"}
    assert shown["auroc"][0] == pytest.approx(fit["auroc"], abs=1e-9) and fit["auroc"] >= 0.9
    assert shown["accuracy"][0] == pytest.approx(fit["accuracy"], abs=1e-9)
    assert f"AUROC {fit['auroc']:.3f}" in shown["auroc"][1]
    assert f"accuracy {fit['accuracy']:.3f}" in shown["accuracy"][1]
    assert "bridge_fit" in browser.find_element("id", "fit-result").text  # where it was saved
    # Registered at the layer, and offered in the picker at once.
    listed = {p["id"]: p for p in requests.get(f"{BASE}/v1/steering/saes", timeout=30).json()["probes"]}
    assert listed["bridge_fit"]["layer"] == sae_layer and listed["bridge_fit"]["labels"] == ["bridge"]
    choices = [
        o.get_attribute("value") for o in browser.find_elements("css selector", "#probe-select option")
    ]
    assert "bridge_fit/bridge" in choices
    browser.save_screenshot(str(shots / "playground-fit.png"))

    # Chosen, it paints the next answers with the API's scores.
    Select(browser.find_element("id", "probe-select")).select_by_value("bridge_fit/bridge")
    browser.find_element("id", "clear").click()
    send_and_wait(browser)
    request = browser.execute_script("return state.lastRequest")
    assert "bridge_fit" in request["steering"]["inspect"]["probes"]
    answer = api_chat(request)["steering"]
    painted = probe_map(browser, "steered")
    assert painted["shown"] and painted["name"].startswith("probe bridge_fit/bridge")
    want = [scores["bridge_fit"]["bridge"] for scores in answer["probes"]]
    assert [c["score"] for c in painted["cells"]] == pytest.approx(want, rel=1e-3, abs=1e-3)


def test_fit_a_vector_in_the_page(browser, sae_layer):
    """A vector fitted from pairs in the form: the norm the API answers to the same body, offered at once."""
    from steer_demo.prompts import BRIDGE_PROMPTS, OTHER_PROMPTS

    bridge, others = BRIDGE_PROMPTS[:4], [p for _, p in OTHER_PROMPTS][1::7][:4]
    text, error, shown = fit_form(browser, "vector", "bridge_dir", sae_layer, bridge, others)
    assert not error, text
    sent = browser.execute_script("return state.lastFitRequest")
    pairs = [{"positive": p, "negative": n} for p, n in zip(bridge, others)]
    assert sent == {
        "kind": "vector", "body": {"id": "bridge_dir", "layer": sae_layer, "pooling": "mean", "pairs": pairs}
    }  # fmt: skip
    api = admin_post("/v1/steering/vectors:fit", {**sent["body"], "id": "bridge_dir_api"})
    assert api.status_code == 201, api.text
    assert shown["norm"][0] == pytest.approx(api.json()["norm"], rel=1e-6)
    options = [
        o.get_attribute("value") for o in browser.find_elements("css selector", "#vector-select option")
    ]
    assert "bridge_dir" in options


def test_a_bad_fit_shows_the_servers_error(browser, sae_layer):
    """One class only: the page shows the server's error, naming the field; nothing is registered."""
    from steer_demo.prompts import BRIDGE_PROMPTS

    text, error, shown = fit_form(
        browser, "probe", "one_class", sae_layer, BRIDGE_PROMPTS[:4], [], ("a", "b")
    )
    assert error and not shown
    body = browser.execute_script("return state.lastFitRequest")["body"]
    api = admin_post("/v1/steering/probes:fit", body)
    assert api.status_code == 400, api.text
    # The server's message names the field (`param: message`); the page shows it once.
    assert api.json()["error"]["param"] == "examples"
    assert text == api.json()["error"]["message"] and text.startswith("examples: all examples have one label")
    listed = requests.get(f"{BASE}/v1/steering/saes", timeout=30).json()["probes"]
    assert "one_class" not in [p["id"] for p in listed]
    # Without the admin key, the server's refusal is shown.
    browser.find_element("id", "fit-admin-key").clear()
    submit_fit(browser)
    status = browser.find_element("id", "fit-status")
    assert "error" in status.get_attribute("class")
    refused = requests.post(f"{BASE}/v1/steering/probes:fit", json=body, timeout=60)
    assert refused.status_code == 401
    error = refused.json()["error"]
    assert error["param"] == "x-steer-admin-key" and status.text == error["message"]
    assert status.text.startswith("x-steer-admin-key: ")
    # The admin key is kept nowhere but the input.
    stored = browser.execute_script(
        "return JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])"
    )
    assert ADMIN_KEY not in stored


def test_bad_value_shows_the_servers_error(browser):
    row = browser.find_elements("css selector", "#ops .op-row")[0]
    value = row.find_element("css selector", "input.value-num")
    value.clear()
    value.send_keys("1e9")
    browser.find_element("id", "send").click()
    status = wait(
        browser,
        lambda d: (
            d.find_element("id", "status")
            if "error" in d.find_element("id", "status").get_attribute("class")
            else None
        ),
        timeout=60,
    )
    assert "steering.features[0].value" in status.text
    assert requests.get(f"{BASE}/health", timeout=10).status_code == 200
