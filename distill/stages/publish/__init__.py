"""publish, split by job: gguf (artifacts), parity (each artifact in its runtime), serving (routing rule and
configs), card (MODEL_CARD.md, report.md) and stage (``run``, what the pipeline calls).

    python -m distill publish recipe=support_tickets run_dir=DIR
"""

from distill.stages.publish.card import parity_lines, render_card, report_markdown
from distill.stages.publish.gguf import build_artifacts, convert_to_gguf, merge_adapter, model_name, quantize_gguf
from distill.stages.publish.parity import check_parity, classifier_parity, stop_check
from distill.stages.publish.serving import SERVER_CTX, build_rule, litellm_config, ollama_template, write_serving
from distill.stages.publish.stage import check_adapter, run

__all__ = ["SERVER_CTX", "build_artifacts", "build_rule", "check_adapter", "check_parity", "classifier_parity",
           "convert_to_gguf", "litellm_config", "merge_adapter", "model_name", "ollama_template", "parity_lines",
           "quantize_gguf", "render_card", "report_markdown", "run", "stop_check", "write_serving"]
