"""The feature browser: its numbers against NumPy computed from scratch, and
its pages in a real browser (headless Chromium through selenium; the group
marked `browser`)."""

import json
import shutil

import numpy as np
import pytest

from sae_jax import features
from sae_jax import saelens
from tests import reference
from tests import scripts
from tests.helpers import SMALL
from tests.helpers import train_script

BROWSE = scripts.load("browse")
RUN_ARGS = ["--dict-size", "32", "--k", "4", "--l", "2", "--batch-size", "32", "--steps", "12",
            "--warmup-steps", "2", "--threshold-start", "4", "--eval-tokens", "64",
            "--calibration-tokens", "256", "--downstream-contexts", "4", "--no-progress"]
CONTEXTS, SAMPLES, WINDOW = 5, 3, 4


def random_sae(architecture: str, D=6, F=10, seed=0):
  rng = np.random.default_rng(seed)
  weights = {"W_enc": rng.standard_normal((D, F)).astype(np.float32),
             "W_dec": rng.standard_normal((F, D)).astype(np.float32),
             "b_enc": rng.standard_normal(F).astype(np.float32) * 0.1,
             "b_dec": rng.standard_normal(D).astype(np.float32) * 0.1,
             "threshold": rng.uniform(0.5, 1.5, F).astype(np.float32)}
  cfg = {"architecture": architecture, "k": 3}
  return weights, cfg, rng.standard_normal((700, D)).astype(np.float32)


@pytest.mark.parametrize("architecture", ["jumprelu", "topk", "jumprelu uncentred"])
def test_scan_equals_numpy(architecture):
  weights, cfg, x = random_sae(architecture.split()[0])
  z = saelens.encode(weights, cfg, x)  # SAELens' formulas, the whole array at once
  if architecture == "jumprelu uncentred":  # a JumpReLU SAE's: x @ W_enc + b_enc
    cfg["apply_b_dec_to_input"] = False
    h = x @ weights["W_enc"] + weights["b_enc"]
    z = np.maximum(h, 0) * (h > weights["threshold"])
    np.testing.assert_allclose(saelens.encode(weights, cfg, x), z, rtol=1e-6)
  held = (500, 650)
  p = features.scan(weights, cfg, lambda a, b: x[a:b], len(x), held, contexts=4, samples=3,
                  chunk_rows=128, progress=False)
  assert p.held_out == 150
  np.testing.assert_array_equal(p.count_F, (z[500:650] > 0).sum(0))
  np.testing.assert_array_equal(p.fired_F, (z > 0).sum(0))
  np.testing.assert_allclose(p.total_F, z.sum(0), rtol=1e-5)
  bins = np.searchsorted(features.EDGES, z, side="right")  # 0: below the first edge
  for j in range(z.shape[1]):
    np.testing.assert_array_equal(
        p.hist_FB[j], np.bincount(bins[z[:, j] > 0, j], minlength=len(features.EDGES) + 1))
  for j in range(z.shape[1]):
    order = np.argsort(-z[:, j], kind="stable")[:4]
    order = order[z[order, j] > 0]
    np.testing.assert_array_equal(p.top_Fk[j][:len(order)], order)
    assert (p.top_Fk[j][len(order):] == -1).all()
    np.testing.assert_allclose(p.top_value_Fk[j][:len(order)], z[order, j], rtol=1e-6)
    drawn = p.sample_Fs[j][p.sample_Fs[j] >= 0]
    assert len(drawn) == min(3, (z[:, j] > 0).sum()) and len(set(drawn)) == len(drawn)
    assert (z[drawn, j] > 0).all()
    # A latent's activation on chosen rows, alone, is its column of the codes.
    rows = np.arange(0, 700, 7)
    kth = p.kth_N[rows] if p.kth_N is not None else None
    np.testing.assert_allclose(features.activation(weights, cfg, j, x[rows], kth), z[rows, j],
                               rtol=1e-5, atol=1e-6)


def test_neighbours_and_logit_lens_equal_numpy():
  rng = np.random.default_rng(3)
  W_dec, W_U = rng.standard_normal((50, 8)), rng.standard_normal((8, 40))
  ids, cos = features.neighbours(W_dec.astype(np.float32), n=4, block=16)
  unit = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
  full = unit @ unit.T
  np.fill_diagonal(full, -np.inf)
  np.testing.assert_array_equal(ids, np.argsort(-full, axis=1)[:, :4])
  np.testing.assert_allclose(cos, -np.sort(-full, axis=1)[:, :4], rtol=1e-5)
  top, top_v, bottom, bottom_v = features.logit_lens(W_dec.astype(np.float32),
                                                   W_U.astype(np.float32), n=3, block=16)
  logits = W_dec @ W_U
  np.testing.assert_array_equal(top, np.argsort(-logits, axis=1)[:, :3])
  np.testing.assert_array_equal(bottom, np.argsort(logits, axis=1)[:, :3])
  np.testing.assert_allclose(bottom_v, np.sort(logits, axis=1)[:, :3], rtol=1e-4)


@pytest.fixture(scope="module")
def lm_run(cache, tmp_path_factory):
  """A tiny run on the tiny GPT-NeoX's cache, and its browser."""
  out = tmp_path_factory.mktemp("browse") / "run"
  assert train_script.main([*RUN_ARGS, "--data", str(cache), "--out", str(out)]) == 0
  assert BROWSE.main([str(out), "--tokens", "700", "--contexts", str(CONTEXTS), "--samples",
                      str(SAMPLES), "--window", str(WINDOW), "--chunk", "8",
                      "--no-progress"]) == 0
  return out


def codes(run, cache) -> tuple:
  """(codes [N, F], token ids, positions) of the whole cache, by SAELens' formulas."""
  weights, cfg = saelens.load(run / "saelens")
  manifest = json.loads((cache / "manifest.json").read_text())
  load = lambda kind: np.concatenate([np.load(cache / s["files"][kind])
                                      for s in manifest["shards"]])
  return saelens.encode(weights, cfg, load("acts").astype(np.float32)), load("tokens"), \
      load("positions")


def expected_contexts(run, cache, lm, j):
  """Latent j's top contexts computed here from scratch: the cache's rows
  encoded by SAELens' formulas, the windows cut by position, the tokens
  decoded by the model's tokenizer."""
  import transformers
  z, tokens, positions = codes(run, cache)
  tokenizer = transformers.AutoTokenizer.from_pretrained(lm["model"])
  out = []
  for r in np.argsort(-z[:, j], kind="stable")[:CONTEXTS]:
    if z[r, j] <= 0:
      break
    keep = [s for s in range(r - WINDOW, r + WINDOW + 1) if 0 <= s < len(z)
            and positions[s] - positions[r] == s - r
            and all(positions[t + 1] == positions[t] + 1 for t in range(min(s, r), max(s, r)))]
    out.append({"tokens": [tokenizer.decode([t]) for t in tokens[keep]],
                "acts": z[keep, j], "peak": keep.index(r)})
  return out


def read_index(run) -> dict:
  return json.loads((run / "browser" / "data" / "index.js").read_text()[len("SAE.index("):-3])


def read_latent(run, j, chunk=8) -> dict:
  text = (run / "browser" / "data" / f"latents-{j // chunk}.js").read_text()
  return json.loads(text[len("SAE.chunk("):-3])[j % chunk]


@pytest.mark.slow
def test_the_pass_reads_the_runs_data(lm_run, cache):
  index = read_index(lm_run)
  z, _, _ = codes(lm_run, cache)
  held = z[-64:]  # the run's held-out rows: --eval-tokens 64
  assert index["held_out_rows"] == 64 and index["rows"] == 700
  np.testing.assert_allclose(index["density"], (held > 0).mean(0), rtol=1e-3)
  assert sorted(p.name for p in (lm_run / "browser" / "data").iterdir()) == [
      "index.js", "latents-0.js", "latents-1.js", "latents-2.js", "latents-3.js"]


@pytest.mark.slow
def test_pool_share_is_the_training_rule_on_each_batch(lm_run, cache):
  """Each latent's share of the batches whose Sampled-SAE pool held it,
  against NumPy: the 700 rows in blocks of 16 batches of 32, each block
  shuffled by default_rng(0), each batch's pool the P = k·l = 8 columns of
  largest l2 norm of relu(pre) in training units (ties to the lower id)."""
  index = read_index(lm_run)
  weights, _ = saelens.load(lm_run / "saelens")
  scale = json.loads((lm_run / "summary.json").read_text())["input_scale"]
  z, _, _ = codes(lm_run, cache)
  manifest = json.loads((cache / "manifest.json").read_text())
  x = np.concatenate([np.load(cache / s["files"]["acts"]) for s in manifest["shards"]])
  x = x.astype(np.float64)
  rng, held, batches = np.random.default_rng(0), np.zeros(32), 0
  for start in range(0, 672, 16 * 32):  # 21 whole batches of 32 rows
    block = x[start:min(start + 512, 672)]
    block = block[rng.permutation(len(block))]
    for b in range(0, len(block), 32):
      pre = scale * ((block[b:b + 32] - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
      held[reference.pool(reference.scores(pre, "l2"), 8)] += 1
      batches += 1
  assert index["pool_batches"] == batches == 21 and index["pool_size"] == 8
  np.testing.assert_allclose(index["pool"], held / batches, rtol=1e-3)
  assert len(set(index["pool"])) > 1  # not every latent in every pool
  assert read_latent(lm_run, 5)["pool"] == index["pool"][5]


@pytest.fixture(scope="module")
def stream_run(lm, tmp_path_factory):
  """A tiny --stream run on the text the cache fixture was exported from, and
  its browser, built from the JAX model over that text (no cache)."""
  out = tmp_path_factory.mktemp("browse-stream") / "run"
  args = ["--data", "pythia", "--stream", "--model", lm["model"], "--dataset",
          *lm["texts"]["txt"], "--hook", "blocks.1.hook_resid_post", "--context-length", "16",
          "--stream-contexts", "8", "--cache-dir", str(out.parent / "no-cache")]
  assert train_script.main([*RUN_ARGS, *args, "--out", str(out)]) == 0
  assert BROWSE.main([str(out), "--tokens", "700", "--contexts", str(CONTEXTS), "--samples",
                      str(SAMPLES), "--window", str(WINDOW), "--chunk", "8",
                      "--no-progress"]) == 0
  return out


@pytest.mark.slow
def test_a_stream_run_takes_its_contexts_from_the_model(stream_run, cache, lm):
  """The --stream run's rows, made by the JAX model, are the rows the torch
  export wrote to the cache from the same text: the held-out densities are
  those of the text's first 64 rows, and the densest latent's top contexts
  are those computed from the cache."""
  index = read_index(stream_run)
  assert index["held_out_rows"] == 64 and index["rows"] == 700 and index["text"]
  z, _, _ = codes(stream_run, cache)
  np.testing.assert_allclose(index["density"], (z[:64] > 0).mean(0), rtol=1e-3)
  j = int(np.argmax((z > 0).sum(0)))
  got, want = read_latent(stream_run, j)["top"], expected_contexts(stream_run, cache, lm, j)
  assert len(got) == len(want) > 0
  for g, w in zip(got, want):
    assert g["tokens"] == w["tokens"] and g["peak"] == w["peak"]
    np.testing.assert_allclose(g["acts"], w["acts"], rtol=5e-3, atol=1e-5)


# --- In a real browser ----------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--window-size=1200,900"):
    options.add_argument(flag)
  options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
  driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
  driver.set_page_load_timeout(30)
  driver.implicitly_wait(5)  # bounded waits for elements scripts add
  try:
    yield driver
  finally:
    driver.quit()


def column(driver, key) -> list:
  from selenium.webdriver.common.by import By
  return [td.text for td in driver.find_elements(By.CSS_SELECTOR, f"#latents tbody td.{key}")]


@pytest.mark.browser
def test_the_browser_in_chromium(lm_run, cache, lm, browser, tmp_path):
  from selenium.webdriver.common.by import By
  index = read_index(lm_run)
  browser.get((lm_run / "browser" / "index.html").as_uri())
  assert column(browser, "id") == [str(j) for j in range(32)]  # every latent, by id
  # The header says which tokens the densities are of, and where summary.json's differ.
  title = browser.find_element(By.ID, "title").text
  assert title.startswith(f"{lm_run.name}: 32 latents, densities over {index['rows']} tokens "
                          f"read ({index['held_out_rows']} held out)")
  evaluated = json.loads((lm_run / "summary.json").read_text())["eval_rows"]
  assert index["eval_rows"] == evaluated
  assert (f"the run's {evaluated} held-out tokens" in title) == (
      evaluated != index["held_out_rows"])
  browser.find_element(By.CSS_SELECTOR, 'th[data-key="density"]').click()
  ids = [int(j) for j in column(browser, "id")]
  want = sorted(range(32), key=lambda j: (-index["density"][j], -j))
  assert [index["density"][j] for j in ids] == [index["density"][j] for j in want]
  browser.find_element(By.ID, "min-density").send_keys("0.2")
  assert all(index["density"][int(j)] >= 0.2 for j in column(browser, "id"))
  assert len(column(browser, "id")) == sum(d >= 0.2 for d in index["density"])
  browser.find_element(By.CSS_SELECTOR, 'th[data-key="pool"]').click()  # Sampled-SAE's pools
  shown = [index["pool"][int(j)] for j in column(browser, "id")]
  assert shown == sorted(shown, reverse=True) and len(set(shown)) > 1

  j = ids[0]  # the densest latent
  browser.find_element(By.CSS_SELECTOR, f'tr[data-latent="{j}"] td.id a').click()
  view = browser.find_element(By.ID, "latent")
  assert view.get_attribute("data-latent") == str(j)
  shown = browser.find_elements(By.CSS_SELECTOR, "#top .context")
  expected = expected_contexts(lm_run, cache, lm, j)
  assert len(shown) == len(expected) > 0
  for line, want in zip(shown, expected):
    tokens = line.find_elements(By.CSS_SELECTOR, ".tok")
    assert [t.get_attribute("textContent") for t in tokens] == want["tokens"]
    np.testing.assert_allclose([float(t.get_attribute("data-act")) for t in tokens],
                               want["acts"], rtol=5e-3, atol=1e-6)  # 3 digits
    peaks = [i for i, t in enumerate(tokens) if "peak" in t.get_attribute("class")]
    assert peaks == [want["peak"]]
    lit = [t.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)" for t in tokens]
    assert lit == [a > 0 for a in want["acts"]]  # coloured where the latent fires
  z, _, _ = codes(lm_run, cache)
  drawn = browser.find_elements(By.CSS_SELECTOR, "#samples .context")
  assert len(drawn) == min(SAMPLES, (z[:, j] > 0).sum())
  for line in drawn:  # firings of the latent, each with its activation
    r = int(line.get_attribute("data-row"))
    peak = line.find_element(By.CSS_SELECTOR, ".tok.peak")
    assert float(peak.get_attribute("data-act")) == pytest.approx(z[r, j], rel=5e-3)
    assert z[r, j] > 0
  assert len(browser.find_elements(By.CSS_SELECTOR, "#promotes tr")) == 10
  assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram rect")) == len(features.EDGES) + 1
  tallest = max(int(r.find_element(By.TAG_NAME, "title").get_attribute("textContent")
                     .rsplit(": ", 1)[1])
                 for r in browser.find_elements(By.CSS_SELECTOR, "#histogram rect"))
  assert browser.find_element(By.ID, "histogram-top").text == f"{max(tallest, 1)} tokens"

  browser.find_element(By.ID, "home").click()  # back to the index, then the search box
  box = browser.find_element(By.ID, "search")
  box.send_keys("7\n")
  assert browser.find_element(By.ID, "latent").get_attribute("data-latent") == "7"
  shot = tmp_path / "latent.png"
  assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_saelens_is_one_line(tmp_path, capsys):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  assert BROWSE.main([str(tmp_path / "run")]) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f"error: {tmp_path / 'run' / 'saelens'} holds no saved SAE")


def test_a_cache_of_another_model_is_one_line(lm_run, cache, tmp_path, capsys):
  other = tmp_path / "other"
  shutil.copytree(cache, other)
  manifest = json.loads((other / "manifest.json").read_text())
  (other / "manifest.json").write_text(json.dumps(manifest | {"model": "another/model"}))
  assert BROWSE.main([str(lm_run), "--cache", str(other), "--no-progress"]) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f"error: --cache {other} holds blocks.1.hook_resid_post of "
                         f"another/model; the SAE in {lm_run}/saelens was trained on ")


@pytest.mark.slow
def test_a_synthetic_run_is_matched_with_its_true_directions(tmp_path):
  from sae_jax import synthetic
  out = tmp_path / "run"
  assert train_script.main([*SMALL, "--data", "synthetic", "--steps", "20", "--out",
                            str(out)]) == 0
  assert BROWSE.main([str(out), "--tokens", "512", "--no-progress"]) == 0
  index = json.loads((out / "browser" / "data" / "index.js").read_text()[len("SAE.index("):-3])
  config = json.loads((out / "config.json").read_text())
  truth = synthetic.SyntheticSource(synthetic.SyntheticConfig(**config["synthetic"])).dictionary
  weights, _ = saelens.load(out / "saelens")
  unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
  cos = unit(weights["W_dec"]) @ unit(truth).T
  assert index["truth"] == cos.argmax(1).tolist()
  np.testing.assert_allclose(index["truth_cos"], cos.max(1), rtol=1e-3)
