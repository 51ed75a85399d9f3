"""SUPERB-style frozen probes (phone recognition, speaker identification) of Mel-HuBERT upstreams.

``labels``: the ``.phn``/``.spk`` files beside a manifest; ``features``: upstreams and the features
extracted once; ``heads``: the weighted layer sum and the linear heads; ``run``: seeds, results, tables.
"""
