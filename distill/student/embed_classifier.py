"""student=embed_classifier: a frozen sentence encoder + one linear head per enum field, fit on the teacher's labels.

    python -m distill run recipe=support_tickets student=embed_classifier
    clf = EmbedClassifier.load_published("runs/x/publish/model")       # or EmbedClassifier.from_run(cfg, run_dir)
    answer, confidence, field_confidence = clf.predict(["I was charged twice this month"])[0]

The encoder (the packaged all-MiniLM-L6-v2 unless student.source=hf) stays frozen and reads the raw input (no
prompt): mean-pooled, unit-length embeddings, as sentence-transformers computes them (distill.data.embed). Each enum
field gets a scikit-learn LogisticRegression (lbfgs, so multinomial over the field's values; student.head.
class_weight; train.targets=soft: cross-entropy to the teacher's distribution, each example repeated per value with
that probability as its weight), one per value of student.head.c_grid; the one whose answers agree best with the
teacher's on the val split is kept (val is used for that choice only, so its coverage curve, which publish's routing
threshold comes from, is marginally optimistic). A field's probabilities are softmax(W x + b); the answer's
confidence is the product of its fields' top probabilities, as the LM students' chain-rule probability is.

Files, never pickle (train/head/ and publish/model/head/): head.safetensors holds ``<field>.weight`` [values x dim]
and ``<field>.bias`` [values] (float32); head.json holds each field's values in row order, the encoder's name, the
sha256 of its weights, the pooling and the input length. publish copies the encoder folder beside it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from distill import DistillError, paths, runio
from distill.data import embed
from distill.config import Config, StudentConfig
from distill.student.heads import Answer, FieldHead, fit_heads, predict_heads
from distill.task import Task, load_split

log = logging.getLogger("distill")

FORMAT, FORMAT_VERSION = "distill.embed_classifier", 1
ENCODER_WEIGHTS = "model.safetensors"
POOLING = "mean over the attention mask, then L2 normalisation"
# Encoder files never copied into a published folder: pickled checkpoints (the loader reads safetensors only).
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", ".gitattributes")

class EmbedClassifier:
    """The frozen encoder and the heads, as trained or as published; ``predict`` is what evaluate and a gateway call."""

    def __init__(self, encoder_dir: Path, heads: dict[str, FieldHead], meta: dict, encoder=None):
        self.encoder_dir, self.heads, self.meta = Path(encoder_dir), heads, meta
        self.max_length = int(meta["encoder"]["max_seq_len"])
        self._encoder = encoder or embed.load_encoder(self.encoder_dir)

    def embed(self, texts: list[str], batch_size: int = 64, progress: str | None = None) -> np.ndarray:
        """Unit-length sentence embeddings of ``texts`` [items x dim]."""
        return embed.embed(texts, batch_size, self._encoder, self.max_length, progress)

    def predict(self, texts: list[str], batch_size: int = 64) -> list[Answer]:
        """(answer, confidence, per-field confidence) per text; every field of the answer gets its top value."""
        return self.predict_embedded(self.embed(texts, batch_size))

    def predict_embedded(self, x: np.ndarray) -> list[Answer]:
        """``predict`` for embeddings already computed."""
        return predict_heads(self.heads, x)

    # -- files ---------------------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """head.safetensors + head.json into ``folder`` (created)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, head in self.heads.items():
            tensors[f"{name}.weight"] = np.ascontiguousarray(head.weight, dtype=np.float32)
            tensors[f"{name}.bias"] = np.ascontiguousarray(head.bias, dtype=np.float32)
        save_file(tensors, str(folder / paths.HEAD_WEIGHTS), metadata={"format": FORMAT})
        meta = {**self.meta, "fields": [{"name": n, "values": h.values} for n, h in self.heads.items()]}
        runio.write_json(folder / paths.HEAD_META, meta)

    @classmethod
    def load(cls, head_dir: Path, encoder_dir: Path) -> "EmbedClassifier":
        """Read a head folder and the encoder it was trained on; safetensors and JSON only, nothing unpickled.

        Raises:
            DistillError: a missing or damaged file, or an encoder whose weights are not the ones of training.
        """
        from safetensors.numpy import load_file

        head_dir, encoder_dir = Path(head_dir), Path(encoder_dir)
        try:
            meta = runio.read_json(head_dir / paths.HEAD_META)
            tensors = load_file(str(head_dir / paths.HEAD_WEIGHTS))
            if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                                 f"{FORMAT!r} version {FORMAT_VERSION}")
            heads = {}
            for f in meta["fields"]:
                w, b = tensors[f"{f['name']}.weight"], tensors[f"{f['name']}.bias"]
                if w.shape[0] != len(f["values"]) or b.shape != (len(f["values"]),):
                    raise ValueError(f"field {f['name']!r}: {w.shape[0]} weight rows for {len(f['values'])} values")
                heads[f["name"]] = FieldHead(list(f["values"]), w, b)
        except Exception as exc:  # json / safetensors / a missing key raise several types for a damaged head
            raise DistillError(f"the classifier head in {head_dir} cannot be read ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); re-run train") from None
        weights = encoder_dir / ENCODER_WEIGHTS
        if not weights.is_file():
            raise DistillError(f"no encoder weights {weights} ({ENCODER_WEIGHTS}) for the head in {head_dir}")
        expected = meta["encoder"].get("sha256")
        if expected and runio.sha256_file(weights) != expected:
            raise DistillError(f"the encoder in {encoder_dir} is not the one the head in {head_dir} was trained on "
                               f"(sha256 of {ENCODER_WEIGHTS} differs); re-run train")
        return cls(encoder_dir, heads, {k: v for k, v in meta.items() if k != "fields"})

    @classmethod
    def load_published(cls, model_dir: Path) -> "EmbedClassifier":
        """The classifier publish wrote: ``model_dir``/encoder and ``model_dir``/head."""
        return cls.load(Path(model_dir) / paths.HEAD_DIR, Path(model_dir) / paths.ENCODER_DIR)

    @classmethod
    def from_run(cls, cfg: Config, run_dir: Path) -> "EmbedClassifier":
        """The classifier train wrote into ``run_dir`` (train/head/ + the configured encoder)."""
        head = paths.head_path(run_dir)
        if not (head / paths.HEAD_META).is_file():
            raise DistillError(f"no trained classifier head in {head}; run `python -m distill train "
                               f"student=embed_classifier run_dir={run_dir}`")
        return cls.load(head, encoder_folder(cfg.student))


# ---------------------------------------------------------------------------------------------------------------
# training


def encoder_folder(scfg: StudentConfig) -> Path:
    """The encoder's folder: the packaged MiniLM (student.source=package) or student.path."""
    folder = embed.model_dir() if scfg.source == "package" else Path(scfg.path).expanduser()
    if not (folder / ENCODER_WEIGHTS).is_file():
        raise DistillError(f"student.path {folder} holds no {ENCODER_WEIGHTS}: the embedding classifier's encoder "
                           f"must be a local folder with config.json, {ENCODER_WEIGHTS} and its tokenizer")
    return folder


def _agreement(answers: list[Answer], rows: list[dict]) -> dict[str, float | None]:
    """Share of rows where each field (and the whole answer, ``exact``) equals the teacher's."""
    if not rows:
        return {"exact": None}
    out = {name: round(float(np.mean([a[0][name] == r["teacher"].get(name) for a, r in zip(answers, rows)])), 4)
           for name in (answers[0][0] if answers else {})}
    out["exact"] = round(float(np.mean([a[0] == r["teacher"] for a, r in zip(answers, rows)])), 4)
    return out


def train(cfg: Config, run_dir: Path) -> dict:
    """The train stage for student=embed_classifier: embed, fit the heads, write train/head/. Returns the summary."""
    import torch

    scfg, hcfg = cfg.student, cfg.student.head
    task = Task(cfg)
    if free := [f for f in task.schema.fields if f not in task.schema.enums]:
        # load_config refuses this first; a run dir whose recipe was edited by hand cannot slip past either
        raise DistillError(f"student={scfg.name} answers only enum fields; recipe {cfg.recipe.name!r} has "
                           f"free-text fields {', '.join(free)}: pick a causal-LM student")
    train_rows, val_rows = load_split(run_dir, "train"), load_split(run_dir, "val")
    if not train_rows:
        raise DistillError(f"the train split in {paths.split_path(run_dir, 'train')} is empty; label more inputs "
                           f"(generate.limit) or lower generate.split.test")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    folder = encoder_folder(scfg)
    meta = {"format": FORMAT, "version": FORMAT_VERSION,
            "encoder": {"name": scfg.hub_id or folder.name, "source": scfg.source, "sha256":
                        runio.sha256_file(folder / ENCODER_WEIGHTS), "pooling": POOLING,
                        "max_seq_len": scfg.max_seq_len},
            "head": {"library": "scikit-learn LogisticRegression (lbfgs, multinomial)",
                     "class_weight": hcfg.class_weight}}
    clf = EmbedClassifier(folder, {}, meta)
    log.info("training %s: %s encoder (frozen) + a head per field on %d examples (%d val)", scfg.name,
             meta["encoder"]["name"], len(train_rows), len(val_rows))
    started = time.perf_counter()
    x = clf.embed([r["input"] for r in train_rows], hcfg.batch_size, progress="embed train")
    x_val = clf.embed([r["input"] for r in val_rows], hcfg.batch_size, progress="embed val")
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    soft, sources = None, None
    if cfg.train.targets == "soft":  # the teacher's distribution per field (distill.stages.train.soft)
        from collections import Counter

        from distill.stages.train.soft import teacher_distribution

        soft, sources = {}, Counter()
        for name, values in task.schema.enums.items():
            dists = [teacher_distribution(r, name, values) for r in train_rows]
            soft[name] = np.array([d for d, _ in dists])
            sources.update(src for _, src in dists)
    clf.heads, fields = fit_heads(x, [r["teacher"] for r in train_rows], x_val, [r["teacher"] for r in val_rows],
                                  task.schema.enums, hcfg, soft)
    fit_s = time.perf_counter() - started

    head_dir = paths.head_path(run_dir)
    staging = head_dir.with_name(f".{paths.HEAD_DIR}-staging-{os.getpid()}")
    runio.remove_leftovers(head_dir.parent, f".{paths.HEAD_DIR}-staging-")
    shutil.rmtree(staging, ignore_errors=True)
    clf.save(staging)
    runio.swap_into_place(staging, head_dir)  # a kill leaves the old head or the new one, never a mix
    # An earlier LM run's step log in this folder would describe another student.
    (paths.stage_dir(run_dir, "train") / paths.TRAIN_METRICS).unlink(missing_ok=True)
    train_agreement = _agreement(clf.predict_embedded(x), train_rows)
    val_agreement = _agreement(clf.predict_embedded(x_val), val_rows) if val_rows else {"exact": None}
    log.info("embed_classifier: agreement with the teacher train %s, val %s", train_agreement["exact"],
             val_agreement["exact"])
    return {"student_kind": "embed_classifier", "encoder": meta["encoder"], "head": meta["head"],
            "train_examples": len(train_rows), "val_examples": len(val_rows), "embedding_dim": int(x.shape[1]),
            "fields": fields, "train_agreement": train_agreement, "val_agreement": val_agreement,
            "targets": cfg.train.targets, "soft_targets": {"fields_by_source": dict(sources)} if soft else None,
            "trainable_params": int(sum(h.weight.size + h.bias.size for h in clf.heads.values())),
            "embed_s": round(embed_s, 3), "fit_s": round(fit_s, 3), "device": "cpu",
            "threads": torch.get_num_threads(), "head_sha256": runio.sha256_tree(head_dir)}


# ---------------------------------------------------------------------------------------------------------------
# publishing


def check_head(head_dir: Path, expected_sha256: str | None) -> None:
    """The trained head is complete and the one train finished with. Raises DistillError."""
    retrain = f"re-run `python -m distill train run_dir={head_dir.parent.parent}`"
    missing = [n for n in (paths.HEAD_WEIGHTS, paths.HEAD_META) if not (head_dir / n).is_file()]
    if missing:
        raise DistillError(f"no trained classifier head in {head_dir} (missing {', '.join(missing)}); {retrain}")
    if expected_sha256 and runio.sha256_tree(head_dir) != expected_sha256:
        raise DistillError(f"the classifier head in {head_dir} changed after train finished (its sha256 no longer "
                           f"matches train/DONE.json); {retrain}")


def write_published(cfg: Config, run_dir: Path, model_dir: Path) -> dict[str, dict]:
    """Copy the encoder (safetensors + tokenizer, no pickles) and the head into ``model_dir``; the artifact entry."""
    shutil.copytree(encoder_folder(cfg.student), model_dir / paths.ENCODER_DIR,
                    ignore=shutil.ignore_patterns(*_PICKLE_PATTERNS))
    shutil.copytree(paths.head_path(run_dir), model_dir / paths.HEAD_DIR)
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    return {paths.MODEL_DIR: {"format": "safetensors", "type": "embed_classifier",
                              "runtime": "distill.student.embed_classifier (transformers encoder + numpy heads)",
                              "bytes": size}}


def check_parity(model_dir: Path, rows: list[dict], task: Task, batch_size: int) -> dict:
    """The published files, reloaded in a fresh predictor, against evaluate's answers (evaluate/predictions.jsonl
    rows): with nothing quantized, anything short of the same answer on every item is a broken copy."""
    clf = EmbedClassifier.load_published(model_dir)
    started = time.perf_counter()
    preds = clf.predict([r["input"] for r in rows], batch_size)
    took = time.perf_counter() - started
    answers = [None if task.schema.errors(a) else a for a, _, _ in preds]
    reference = [r.get("student") for r in rows]
    same = sum(a == b for a, b in zip(answers, reference))
    diffs = [abs(c - r["confidence"]) for (_, c, _), r in zip(preds, rows) if r.get("confidence") is not None]
    n = len(rows)
    return {"n": n, "parity": round(same / n, 4) if n else None,
            "agreement_with_reference": round(sum(a is not None and a == b for a, b in zip(answers, reference)) / n, 4),
            "agreement_with_teacher": round(sum(a is not None and a == r["teacher"] for a, r in zip(answers, rows))
                                            / n, 4),
            "invalid_rate": round(sum(a is None for a in answers) / n, 4), "failures": {},
            "max_confidence_diff": float(max(diffs)) if diffs else None, "seconds": round(took, 3),
            "reference": f"evaluate/{paths.PREDICTIONS} (the in-process classifier)"}


def serving_markdown(model: str) -> str:
    """SERVING.md for the classifier: how to load and call it in process (it has no generation server)."""
    lines = [f"# Serving {model}", "",
             "An embedding classifier: it does not generate text, so it has no chat template, stop token, GGUF or "
             "OpenAI-compatible server of its own. Load it in process (the `python -m distill serve` gateway does) "
             "and apply the routing rule to its confidence:", "", "```python",
             "from distill.routing import decide, load_rule",
             "from distill.student.embed_classifier import EmbedClassifier", "",
             f'clf = EmbedClassifier.load_published("publish/{paths.MODEL_DIR}")',
             'rule = load_rule("publish/routing.yaml")',
             "answer, confidence, field_confidence = clf.predict([text])[0]",
             "decision = decide(rule, request, answer, confidence)   # decision.use_student, decision.reason",
             "```", "",
             f"- `{paths.MODEL_DIR}/{paths.ENCODER_DIR}/`: the frozen sentence encoder (safetensors + tokenizer; "
             "`transformers.AutoModel.from_pretrained` loads it).",
             f"- `{paths.MODEL_DIR}/{paths.HEAD_DIR}/{paths.HEAD_WEIGHTS}` + `{paths.HEAD_META}`: per field, "
             "probabilities = softmax(W x + b) over the values listed in head.json (row order), x = the encoder's "
             f"last hidden state {POOLING}. No pickle anywhere.",
             "- confidence = the product of the fields' top probabilities.", "",
             "Files and their sha256 are listed in MODEL_CARD.md."]
    return "\n".join(lines) + "\n"


def training_lines(cfg: Config, train: dict) -> list[str]:
    """The model card's Training section for this rung."""
    enc = train.get("encoder") or {}
    lines = [f"- rung: embed_classifier: encoder `{enc.get('name')}` frozen ({enc.get('pooling')}, at most "
             f"{enc.get('max_seq_len')} tokens), one linear head per field: {(train.get('head') or {}).get('library')}"
             f", class_weight {cfg.student.head.class_weight}, C chosen on val from {cfg.student.head.c_grid}",
             f"- {train.get('train_examples')} train / {train.get('val_examples')} val examples labelled by the "
             f"teacher; agreement with the teacher: train {_fmt((train.get('train_agreement') or {}).get('exact'))}, "
             f"val {_fmt((train.get('val_agreement') or {}).get('exact'))}; embedding {train.get('embed_s')} s, "
             f"fitting {train.get('fit_s')} s"]
    for name, rep in (train.get("fields") or {}).items():
        lines.append(f"- `{name}`: {rep.get('values_seen')} values seen, C={rep.get('C')} (val agreement by C "
                     f"{rep.get('tried')}), converged {rep.get('converged')}")
    return lines


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))
