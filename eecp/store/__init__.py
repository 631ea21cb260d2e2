"""Persistence: the only package that imports peewee. Records in, records out."""
