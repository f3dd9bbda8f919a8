"""visualize"""
