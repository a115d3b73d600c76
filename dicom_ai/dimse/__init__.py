"""dimse"""
