"""bnbench.bench"""
