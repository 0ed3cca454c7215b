"""The recipe that made the bundled model (corpus, tokenizer, training, build, model card): not runtime code.

`python -m workbench.models.recipe.build` rebuilds glm45-air-mini (about an hour on two CPU cores); notebook 4
trains a smaller one with the same pieces. Nothing that serves a model imports this package.
"""
