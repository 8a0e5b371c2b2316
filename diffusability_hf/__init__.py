"""diffusability-hf: scale-equivariance (SE) regularization for diffusers autoencoders.

Implements "Improving the Diffusability of Autoencoders" (Skorokhodov et al., 2025):
spectral analysis of latents (Section 3.1), the SE loss (eq. 2) and its variants (Appendix C).
"""

__version__ = "0.1.0"
