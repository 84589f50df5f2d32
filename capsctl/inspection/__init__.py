"""Pictures of what a trained model learned, split by what each part does:

  draw      drawing primitives: colours, fonts, upscaled tiles, panels, PNG writing
  probe     running a model through its declared contract (capsctl.models.contract):
            reconstructions, perturbed capsules, routing maps, confident examples
  figures   figure layout: reconstruction grid, perturbation panel, routing maps, the
            MultiMNIST segmentation picture, the trainer's TensorBoard pair grid
  commands  checkpoint in, PNG (and TensorBoard image) out: run_reconstruct / run_perturb /
            run_routes, what `capsctl reconstruct|perturb|routes` call

Importing this package is torch-free; the modules above import torch.
"""
