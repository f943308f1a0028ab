"""Dataset work before anything is paid for or trained on.

    pii     redact emails, card numbers and phone numbers (``generate.redact_pii``; the gateway and traffic logs too)
    dedup   the one MinHash deduper: generate's exact/near-duplicate groups and evaluate's decontamination
    split   the leak-free split rule (a hash of the normalised text; near-duplicates share their group's split)
    embed   sentence embeddings from the packaged MiniLM (nearest few-shot seeds, the embedding classifier)
"""
