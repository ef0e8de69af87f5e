"""Data sources, one module each, all yielding RAW EXAMPLES (the data contract's dicts).

    shapes      ShapesSource      procedural scenes + captions + Q/A, no files (random access)
    documents   DocumentsSource   procedural pages of small text + reading Q/A (random access)
    llava_json  LlavaJsonSource   LLaVA JSON / JSONL conversations + image files (random access)
    tfds        TfdsSource        any TFDS ArrayRecord builder, features mapped to roles (random access)
    webdataset  WebDatasetSource  tar shards, streamed per process, resumable via get_state/set_state

Bad records raise `vlm_jax.data.errors.SkipExample(reason, detail)`. Modules are imported on
demand (tensorflow_datasets is slow to import), so this package imports none of them.
"""
