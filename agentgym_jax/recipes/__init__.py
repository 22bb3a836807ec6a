"""Recipes: complete workflows built on the library (e.g. pretraining the embedded tiny BabyAI
model), not part of its core. The library never imports from here."""
