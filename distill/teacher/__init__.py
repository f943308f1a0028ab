"""The teacher: every paid call goes through here, keyed, capped and recorded in the ledger.

    request    the canonical request, the ledger key's rule, the body sent
    pricing    the one cost formula: tokens from text, dollars from tokens, the dry-run estimate
    client     the async OpenAI-compatible client (ledger first, one retry layer, answer validation)
    transport  which failures are retried, how long to wait, which may be billed
    answers    outcomes and the readers of chat answers and top log-probs
    labelling  a run's inputs labelled online, by scoring, or through the Batch API (batch)
    budget     the hard cap on spend, shared by every process using the ledger
    scoring    log-prob scoring with contextual calibration (teacher.method=score)
    server     the llama.cpp server for the local teacher, and ``teacher_endpoint``
"""
