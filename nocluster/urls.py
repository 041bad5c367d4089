from django.contrib import admin
from django.urls import path

from nocluster.admin_views import admin_urls
from nocluster.metrics.views import metrics_view

urlpatterns = [*admin_urls(), path("admin/", admin.site.urls), path("metrics", metrics_view, name="nocluster-metrics")]
