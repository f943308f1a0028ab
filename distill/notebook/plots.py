"""The plots of a run view (``Run.plot_*``): labels, lengths, spend, training, confusion, coverage, cost.

    run = open_run(run_dir); run.plot_coverage()

Each plot reads the run through the view's own tables (so a missing stage comes back as ``NotInRun``) and returns
the closed figure: Jupyter shows it once, scripts leak no open figures.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from distill.notebook.missing import NotInRun


class RunPlots:
    """The plotting half of ``distill.notebook.explore.Run`` (it supplies the tables these read)."""

    def plot_labels(self, source: str = "teacher"):
        """Bar charts of every enum field's value counts, stacked by split."""
        fields = list(self.enum_fields())
        data = self.dataset()
        if not isinstance(data, pd.DataFrame):
            return data
        if not fields:
            return NotInRun("label distribution", "the answer has no field with a fixed value set")
        fig, axes = plt.subplots(1, len(fields), figsize=(5 * len(fields), 3.6), squeeze=False)
        for ax, field in zip(axes[0], fields):
            table = self.label_distribution(field, source)
            table.drop(columns="total").plot.barh(stacked=True, ax=ax)
            ax.invert_yaxis()
            ax.set_title(f"{source} labels: {field}")
            ax.set_xlabel("inputs")
        return _finish(fig)

    def plot_lengths(self):
        """Histogram of input lengths in words, per split."""
        data = self.dataset()
        if not isinstance(data, pd.DataFrame):
            return data
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for split, group in data.groupby("split"):
            ax.hist(group["words"], bins=20, alpha=0.6, label=f"{split} ({len(group)})")
        ax.set_xlabel("words per input")
        ax.set_ylabel("inputs")
        ax.legend()
        return _finish(fig)

    def plot_spend(self):
        """Cumulative teacher dollars and tokens over the calls, in call order."""
        calls = self.ledger_calls()
        if not isinstance(calls, pd.DataFrame):
            return calls
        if calls.empty:
            return NotInRun("teacher spend", "the ledger holds no successful call")
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(range(1, len(calls) + 1), calls["cumulative_usd"], label="$ (left)")
        ax.set_xlabel("teacher calls")
        ax.set_ylabel("cumulative $")
        tokens = ax.twinx()
        tokens.plot(range(1, len(calls) + 1), (calls["prompt_tokens"] + calls["completion_tokens"]).cumsum(),
                    color="tab:orange", label="tokens (right)")
        tokens.set_ylabel("cumulative tokens")
        ax.set_title("teacher spend")
        fig.legend(loc="upper left")
        return _finish(fig)

    def plot_training(self):
        """Training loss (and validation loss, when logged) per step."""
        curves = self.training_curves()
        if not isinstance(curves, pd.DataFrame):
            return curves
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for column in ("loss", "eval_loss"):
            if column in curves and curves[column].notna().any():
                series = curves[column].dropna()
                ax.plot(series.index, series.values, marker="o", label=column)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training" + ("" if self.done("train") else " (train not finished)"))
        ax.legend()
        return _finish(fig)

    def plot_confusion(self, field: str):
        """Heat map of the student-vs-teacher confusion matrix of an enum field."""
        frame = self.confusion(field)
        if not isinstance(frame, pd.DataFrame):
            return frame
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(frame), 1 + 0.5 * len(frame)))
        ax.imshow(frame.values, cmap="Blues")
        ax.set_xticks(range(len(frame.columns)), frame.columns, rotation=45, ha="right")
        ax.set_yticks(range(len(frame.index)), frame.index)
        for i in range(len(frame.index)):
            for j in range(len(frame.columns)):
                if frame.values[i, j]:
                    ax.text(j, i, int(frame.values[i, j]), ha="center", va="center", fontsize=8)
        ax.set_xlabel("student")
        ax.set_ylabel("teacher")
        ax.set_title(f"{field}: student vs teacher")
        return _finish(fig)

    def plot_coverage(self):
        """Coverage and agreement against the confidence threshold, test and validation splits."""
        curves = {split: self.coverage_curve(split) for split in ("test", "val")}
        present = {s: c for s, c in curves.items() if isinstance(c, pd.DataFrame)}
        if not present:
            return curves["test"]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for split, curve in present.items():
            ax.plot(curve["coverage"], curve["agreement"], marker=".", label=f"{split} split")
        ax.set_xlabel("coverage (share of requests the student answers)")
        ax.set_ylabel("agreement with teacher")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title("coverage vs agreement as the confidence threshold rises")
        ax.legend()
        return _finish(fig)

    def plot_cost(self):
        """Teacher vs student dollars per 1,000 requests."""
        cost = self.cost()
        if isinstance(cost, NotInRun):
            return cost
        bars = {"teacher": cost.get("teacher_usd_per_1k"), "student": cost.get("student_usd_per_1k")}
        if any(v is None for v in bars.values()):
            return NotInRun("cost per 1,000 requests", "results.json cost has no teacher/student $ per 1k")
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.bar(list(bars), list(bars.values()), color=["tab:red", "tab:green"])
        for i, value in enumerate(bars.values()):
            ax.text(i, value, f"${value:.4g}", ha="center", va="bottom")
        ax.set_ylabel("$ per 1,000 requests")
        ax.set_title("cost per 1,000 requests")
        return _finish(fig)


def _finish(fig):
    """Lay the figure out and close it: Jupyter shows the returned figure once, scripts leak no open figures."""
    fig.tight_layout()
    plt.close(fig)
    return fig
