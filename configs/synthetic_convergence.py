# The DN-vs-baseline experiments (scripts/convergence.py, scripts/ablate.py): the demo's model and schedule,
# plus the matching-instability probe on 50 training images after every epoch. The scripts set --use_dn,
# --epochs, --lr_drop and --seed per run.
_base_ = "synthetic.py"
instability_probe = 50
