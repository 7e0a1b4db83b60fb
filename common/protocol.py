"""The message contract between the server and the sites: message types, record names, seeds.

Both sides of the wire import these names, so a message type or record the server
sends is the one a site's handler is registered for and reads. Values travel in
Flower Messages: `ArrayRecord`s of adapter arrays, `MetricRecord`s of aggregate
numbers (checked by `common.privacy` on the way out), `ConfigRecord`s of settings.
"""

from __future__ import annotations

# ------------------------------------------------------------------ message types (Flower's category.action)
DESCRIBE = "query.describe"          # the site's name, split sizes, descriptors and effective policy
TRAIN = "train"                      # one federated round of the classifier
TRAIN_IFCA = "train.ifca"            # one IFCA round: the site picks one of k adapters and trains it
PERSONALIZE = "train.personalize"    # the classifier's site-held regimes
EVALUATE = "evaluate"                # every classifier regime scored at the site
COMPARE = "evaluate.compare"         # paired differences between a comparison's arms
SFT = "train.sft"                    # one federated SFT round (generative study)
DPO = "train.dpo"                    # one federated DPO round
GEN_LOCAL = "train.gen_local"        # the generative study's site-held regimes
EVALUATE_GEN = "evaluate.gen"        # every generative task scored per stage and regime

# ------------------------------------------------------------------ record names
ARRAYS = "arrays"            # adapter arrays: the server's start of a round, a site's update or shared local adapter
METRICS = "metrics"          # aggregate numbers only
CONFIG = "config"            # settings of this message (below)
SITE = "site"                # the site's name, in its describe reply
GLOBAL = "global"            # the final global adapter (personalize, evaluate, gen_local)
CLUSTER = "cluster"          # the site's own cluster adapter (evaluate)
IFCA = "ifca"                # the adapter of the IFCA cluster the site chose last (evaluate)
FEDREP = "fedrep"            # the final FedRep backbone (evaluate; the site adds its own head)
IFCA_PREFIX = "ifca."        # `ifca.<j>`: the k IFCA cluster adapters of a round (train.ifca)
SIMILARITY_START = "simw"    # the similarity-weighted regime's starting adapter (personalize)
GLOBAL_SFT, GLOBAL_DPO = "global-sft", "global-dpo"  # the generative study's global adapters (evaluate.gen)
CROSS_PREFIX = "x."          # `x.<regime>`: another site's or cluster's adapter, scored for the cross-site matrix

# ------------------------------------------------------------------ config keys the server sends
RUN_DIR = "run-dir"
ARM = "arm"
SERVER_ROUND = "server-round"
BASE_MODEL = "base-model"
PHASE = "phase"              # which federated rounds a `train` message belongs to: "global", "cluster", "fedrep"
COMPARE_ARMS = "compare-arms"

# ------------------------------------------------------------------ site-level choices a reply may carry
IFCA_CHOICE = "ifca-cluster"                # the index of the IFCA adapter the site chose and trained
INTERPOLATION_WEIGHT = "interpolated-weight"  # the weight a of the global adapter in the site's mix
INTERPOLATION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # the weights a site may choose (and so release)

# ------------------------------------------------------------------ regimes and seeds
SITE_HELD = ("local", "personalized", "similarity-weighted", "augmented",
             "ditto", "interpolated")  # trained and kept at the site (fedrep's head too, but its backbone is federated)
# Each training call seeds its generators from (seed, site, offset): a federated round
# uses its round number; the site-held regimes use these, far from any round number,
# so every call draws its own batches and a resumed study repeats them exactly.
SEED_LOCAL = 10_000
SEED_PERSONALIZED = 20_000
SEED_SIMILARITY = 30_000
SEED_AUGMENTED = 40_000
SEED_FEDREP = 50_000
SEED_DITTO = 60_000
SEED_IFCA_ROUND = 500       # + round: an IFCA round (its own batches, not the global round's)
SEED_DPO_ROUND = 100        # + round: the generative study's DPO rounds
# the generative study's site-held stages
SEED_GEN_LOCAL_SFT, SEED_GEN_LOCAL_DPO, SEED_GEN_PERSONALIZED = 10_000, 20_000, 30_000


def cross_record(regime: str) -> str:
    """The record name of a cross-site adapter (`local@h03`, `cluster@c1`)."""
    return f"{CROSS_PREFIX}{regime}"
