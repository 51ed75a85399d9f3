"""How the files this project reads and writes identify themselves: magic bytes and format tags.

One owner for each, so that the readers that check a file (:mod:`~melhubert_fairseq.file_sniffing`,
:mod:`~melhubert_fairseq.data.kaldi`) and the writers that stamp it (:mod:`~melhubert_fairseq.kmeans.files`)
agree. Nothing here imports anything: every module may use it.
"""

#: How a NumPy ``.npy`` file starts (numpy's ``numpy.lib.format.MAGIC_PREFIX``).
NPY_MAGIC = b"\x93NUMPY"

#: How a torch.save file before torch 1.6 (not a zip archive) starts: pickle protocol 2, then torch's magic number.
LEGACY_TORCH_HEADER = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

#: How a zip archive (torch.save's format since torch 1.6, NumPy's ``.npz``) starts.
ZIP_MAGIC = b"PK\x03\x04"

#: The ``format`` of the JSON sidecar of a k-means model written by melhubert-learn-kmeans.
KMEANS_FORMAT = "melhubert-kmeans-v1"

#: The ``format`` of the JSON sidecar of a frame sample (``melhubert-learn-kmeans --rank``).
SAMPLE_FORMAT = "melhubert-kmeans-sample-v1"
