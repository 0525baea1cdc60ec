"""Names the command line needs before anything heavy is imported (no numpy, torch, matplotlib)."""

#: File formats :func:`landscape.plots.save_figures` writes.
FIGURE_FORMATS = ("png", "pdf", "svg")
#: Figures :func:`landscape.plots.save_figures` writes (file stems), in order.
FIGURE_NAMES = ("training_loss", "sharpness_over_time", "sharpness_ratio", "landscape_lines", "update_histograms",
                "cosine_heatmap", "smoothness", "coordinate_smoothness")
#: The curvature figures (:mod:`landscape.curvature_plots`), written when the run measured curvature.
CURVATURE_FIGURE_NAMES = ("edge_of_stability", "eigenvalues", "trace", "spectral_density", "sharpness_layers")
FIGURE_NAMES = FIGURE_NAMES + CURVATURE_FIGURE_NAMES
#: Figure widths: one paper column or the full text width.
FIGURE_WIDTHS = ("single", "double")
#: Formats :func:`landscape.report.report` produces.
REPORT_FORMATS = ("md", "latex", "csv", "json")
#: Layouts :func:`landscape.report.report` produces: the full report, Pan & Li 2023's Table 1 (one
#: step) and Tables 4-7 (the ratio to SGD along the trajectory).
REPORT_TABLES = ("full", "step", "trajectory")
