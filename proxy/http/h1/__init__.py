"""http/h1"""
