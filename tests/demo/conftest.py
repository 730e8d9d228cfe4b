"""SAELens' SAE classes without its training stack (the SAE format tests' fixture), for the demo SAE's check."""

from ..sae.conftest import saelens_ref  # noqa: F401
