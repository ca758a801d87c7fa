"""letkit"""
