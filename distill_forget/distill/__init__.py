"""The Distill-Forget-Repeat step: one unlearning request by teacher-student distillation.

    networks.py    the frozen networks as the step calls them (counted UNet, prompt encoder)
    prompts.py     forget / mapped / retain / neighbour prompts of a request
    targets.py     score distance; choice of mapping targets and neighbours
    replay.py      teacher latents: a per-request bank, or fresh samples per micro-batch
    objectives.py  the losses (forget mapping, replays, parameter anchor; ESD, concept ablation, L1/L2-SP)
    regularizers.py  selective fine-tuning mask and gradient projection (act on gradients and weights)
    module.py      the Lightning module that sums them and trains the student
    step.py        run_step: one request from a teacher folder to a student folder
"""
