"""Feature names beside the SAE: Neuronpedia explanation exports (`neuronpedia`) and the search that ranks
features by how well their labels and explanations match a query (`search`)."""
