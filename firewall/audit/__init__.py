"""Auditor evidence: the report (data, HTML, SVG, CLI), the segmentation test and generated docs."""
