"""Registry of the dataset files: where each lives, where it comes from, its checksum.

The sha256 values are those of the checked copies in shared/data (see its README.md and
SHA256SUMS): the official MNIST and Fashion-MNIST files, Larochelle & Murray's static
binarized MNIST (MATLAB files) and the 105x105 Omniglot arrays. A downloaded file is only
moved into place when its sha256 matches; existing files are checked the same way.

Files that are read when present but never downloaded (no checksum we could confirm):
Burda et al.'s 28x28 Omniglot `chardata.mat` and the text `.amat` form of binarized MNIST.
"""

from __future__ import annotations

from dataclasses import dataclass

# Pinned commits so that a download always fetches the bytes the checksum describes.
_ARM_GRADIENT = ("https://raw.githubusercontent.com/mingzhang-yin/ARM-gradient/"
                 "9b5f74da4e4009c5556e8d7a87c88c8e291c253d/")
_OMNIGLOT_NPZ = ("https://raw.githubusercontent.com/bitsandscraps/omniglot/"
                 "b0481240b7eb42393285a93ce7d2f266ff10c62b/")
_FASHION_GITHUB = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
                   "b2617bb6d3ffa2e429640350f613e3291e10b141/data/fashion/")
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                  "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    _FASHION_GITHUB)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset folder: its name there, size, sha256 and download URLs (in order)."""

    name: str
    size: int
    sha256: str
    urls: tuple[str, ...]


def _mirrored(name: str, size: int, sha256: str, mirrors: tuple[str, ...]) -> RemoteFile:
    return RemoteFile(name, size, sha256, tuple(m + name for m in mirrors))


# Dataset name (DataConfig.name) -> folder under the data root.
FOLDERS = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "binarized_mnist": "binarized_mnist",
    "omniglot": "omniglot",
    "colour_mnist": "mnist",  # made from the MNIST files (datasets.colourize_digits)
}

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

MNIST = {
    "train_images": _mirrored(IDX_NAMES["train_images"], 9_912_422,
                              "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                              _MNIST_MIRRORS),
    "train_labels": _mirrored(IDX_NAMES["train_labels"], 28_881,
                              "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                              _MNIST_MIRRORS),
    "test_images": _mirrored(IDX_NAMES["test_images"], 1_648_877,
                             "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                             _MNIST_MIRRORS),
    "test_labels": _mirrored(IDX_NAMES["test_labels"], 4_542,
                             "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                             _MNIST_MIRRORS),
}

FASHION_MNIST = {
    "train_images": _mirrored(IDX_NAMES["train_images"], 26_421_880,
                              "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                              _FASHION_MIRRORS),
    "train_labels": _mirrored(IDX_NAMES["train_labels"], 29_515,
                              "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                              _FASHION_MIRRORS),
    "test_images": _mirrored(IDX_NAMES["test_images"], 4_422_102,
                             "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                             _FASHION_MIRRORS),
    "test_labels": _mirrored(IDX_NAMES["test_labels"], 5_148,
                             "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                             _FASHION_MIRRORS),
}

# In ARM-gradient the MATLAB files carry an `.amat` name; here they are stored as `.mat`.
BINARIZED_MNIST = {
    "train": RemoteFile("binarized_mnist_train.mat", 2_852_060,
                        "79a0312c7389d855cfc97e3812de3998417c5829d8a51543b56a90a91252ae7e",
                        (_ARM_GRADIENT + "binarized_mnist_train.amat",)),
    "valid": RemoteFile("binarized_mnist_valid.mat", 571_883,
                        "7436afc856959075c7787025bb8a4ba2b520b9230ee39667c66aa7dd2819dd68",
                        (_ARM_GRADIENT + "binarized_mnist_valid.amat",)),
    "test": RemoteFile("binarized_mnist_test.mat", 490_132,
                       "5bc30222e1e7896cbccd1e1db6b28540cc1230f4d2d5473841a5f6cc54be8d38",
                       (_ARM_GRADIENT + "binarized_mnist_test.amat",)),
}

OMNIGLOT_NPZ = {
    "background": RemoteFile("images_background.npz", 3_340_794,
                             "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
                             (_OMNIGLOT_NPZ + "images_background.npz",)),
    "evaluation": RemoteFile("images_evaluation.npz", 2_415_269,
                             "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
                             (_OMNIGLOT_NPZ + "images_evaluation.npz",)),
}

# Read when the user has it (Burda et al.'s 28x28 Omniglot, the one papers report on);
# never downloaded, because no checksum for it could be confirmed here.
OMNIGLOT_CHARDATA = "chardata.mat"
OMNIGLOT_CHARDATA_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"

# Text `.amat` form of static binarized MNIST (Larochelle's original release), read when the
# `.mat` files are absent.
BINARIZED_MNIST_AMAT = {split: f"binarized_mnist_{split}.amat" for split in ("train", "valid", "test")}
