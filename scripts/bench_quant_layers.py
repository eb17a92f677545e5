"""Layer-level tuning of the GPTQ sweep's guard (issue 15): held-out output error vs round-to-nearest.

For a few decoder layers of a model (dense inputs), each Linear is swept onto the Q4_0 lattice with
every setting of (calibration size, damping, diag-shrink A, scale candidates), H from C4 train
windows; the error is measured on WikiText-2 *validation* windows (BOS first, as llama.cpp scores)
and reported as a ratio to ggml's round-to-nearest on the same windows.  Chooses QuantizeConfig's
defaults; results in docs/bench_quant.md.

    python scripts/bench_quant_layers.py 2,10,20,28 CHECKPOINT   # ~15 min on 2 cores
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
from dsnot_deploy.algorithms.pruner import shrink_toward_diagonal
from dsnot_deploy.quant.gptq import QuantizeConfig, gptq_sweep
from dsnot_deploy.quant.lattice import LATTICES, ggml_round_trip
from dsnot_deploy.sources.models import find_decoder_layers, load_model
from dsnot_deploy.sources.textdata import (
    load_text_source,
    sample_calibration,
    tokenize_eval,
)

torch.set_num_threads(2)
L = load_model(sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m", dtype=torch.float32)
model, tok = L.model, L.tokenizer
path, layers = find_decoder_layers(model)
docs = list(load_text_source(str(DATA / "c4" / "en-train" / "c4_sample.jsonl")).documents)
c4_64 = sample_calibration(tok, docs, 64, 512, 0)
c4_16 = c4_64[:16]
ids = tokenize_eval(tok, load_text_source(str(DATA / "wikitext-2-raw-v1" / "wiki.valid.raw")).eval_text("llamacpp"))
wiki = ids[: 8 * 512].reshape(8, 512).clone(); wiki[:, 0] = tok.bos_token_id
want = [int(a) for a in sys.argv[1].split(",")]
names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
def hs(samples):
    H, N, hooks = {}, {}, []
    for li in want:
        for n in names:
            def hook(m, a, o, key=(li, n)):
                x = a[0].reshape(-1, a[0].shape[-1]).float()
                H[key] = H.get(key, 0) + x.T @ x; N[key] = N.get(key, 0) + x.shape[0]
            hooks.append(layers[li].get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        for r in samples: model(r.unsqueeze(0))
    for h in hooks: h.remove()
    return {k: H[k] / N[k] for k in H}
Hc = {"16x512": hs(c4_16), "64x512": hs(c4_64)}
Hv = hs(wiki)
lat = LATTICES["Q4_0"]
res = {}
def e(w, a, H): return float((((w - a) @ H) * (w - a)).sum())
settings = [(c, d, al, sh) for c in ["16x512", "64x512"] for d in [0.01, 0.1] for al in [0.0, 0.3, 0.6, 1.0] for sh in ["1", "grid"]]
rows = []
for li in want:
    for n in names:
        w = layers[li].get_submodule(n).weight.detach().float()
        r = torch.from_numpy(ggml_round_trip(w, lat))
        k=(li, n); er = e(w, r, Hv[k])
        for (c, d, al, sh) in settings:
            if sh == "grid" and al not in (0.3, 1.0): continue
            shr = (1.0,) if sh == "1" else (1.0, 0.95, 0.9, 0.85, 0.8)
            q = gptq_sweep(w, shrink_toward_diagonal(Hc[c][k], al), QuantizeConfig(type="Q4_0", damping=d, shrinks=shr))
            rows.append({"layer": li, "lin": n, "calib": c, "damp": d, "alpha": al, "shrinks": sh, "ratio": e(w, q, Hv[k]) / er,
                         "calib_ratio": e(w, q, Hc[c][k]) / e(w, r, Hc[c][k])})
        print(li, n, flush=True)
(ROOT / "docs" / "bench_quant_layers.json").write_text(json.dumps(rows, indent=1))
import collections

agg = collections.defaultdict(list)
for r in rows: agg[(r["calib"], r["damp"], r["alpha"], r["shrinks"])].append(r["ratio"])
for k, v in sorted(agg.items(), key=lambda kv: sum(kv[1]) / len(kv[1])):
    print(k, f"mean {sum(v)/len(v):.3f} max {max(v):.3f}")
