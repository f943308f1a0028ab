"""The student: how it is loaded, prompted and asked, wherever it runs.

    models          the base and the trained adapter (GGUF, folder or hub id, random), loaded for training or scoring
    template        the chat-template contract: one rendering for training, evaluation and serving
    predictions     what a predictor returns (Predictions) and how answers are compared (agreement)
    predict         in-process predictors: scored decoding, free decoding, the embedding classifier
    scored          the scored decoder: enum values ranked through a KV cache and a token trie
    endpoint        the one OpenAI-compatible client for a served student (llama.cpp, vLLM, any gateway)
    embed_classifier  student=embed_classifier: a frozen encoder and one linear head per enum field

evaluate and publish both ask the student through these modules; neither imports the other.
"""
