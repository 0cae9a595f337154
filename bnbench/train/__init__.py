"""bnbench.train"""
