"""The names of a run directory's stages and artifacts: declared here once (torch-free, so
`reporting` and other readers of run directories import them without the training stack)."""

DEFAULT_RUN = "runs/latest"        # the run directory when neither --run nor $DPSYNTH_RUN is given

SELECT_PUBLIC = "select-public"
PRETRAIN = "pretrain"
FINETUNE = "finetune"
GENERATE = "generate"
EVALUATE = "evaluate"
STAGES = (SELECT_PUBLIC, PRETRAIN, FINETUNE, GENERATE, EVALUATE)

SELECTION = "selection.json"        # select-public: the DP histogram and the chosen public classes
PRETRAINED = "pretrained.pt"        # pretrain: the generator before DP fine-tuning
CENTRAL = "central_images.npz"      # pretrain (DP-FETA): the DP central images
AUXILIARY = "auxiliary.pt"          # pretrain (FETA-Pro): the generator fitted to the DP frequency release
GENERATOR = "generator.pt"          # finetune: the DP generator
CHECKPOINT_PREFIX = "checkpoint-"   # finetune: checkpoint-<step>.pt while a stage can be resumed
SYNTHETIC = "synthetic.npz"         # generate: images and labels
GRID = "samples.png"                # generate: a grid of samples per class
RESULTS_CSV = "results.csv"         # evaluate: one row per protocol
