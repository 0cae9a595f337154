"""bnbench.report"""
