<#
.SYNOPSIS
    Instala, arranca, detiene, elimina o consulta el servicio de Windows de sam-callback con NSSM.

.DESCRIPTION
    sam-callback se ejecuta como "python -m sam.callback serve" dentro de la carpeta de instalación
    (AppDirectory), de modo que lee su configuración del fichero .env de esa carpeta: los secretos
    (CALLBACK_TOKEN, SQL_SAM_PWD...) no se copian al registro de Windows.
    La salida estándar y de errores del proceso va a la carpeta de logs (LOG_DIRECTORY del .env,
    o C:\RPA\Logs\SAM), con rotación de NSSM; el log principal del servicio lo rota el propio
    servicio a medianoche en esa misma carpeta.
    La parada es ordenada: NSSM envía Ctrl+C a la consola del proceso y espera hasta 35 s a que
    termine las peticiones en curso y vacíe su cola de escritura.
    Documentación: docs/windows.md

.PARAMETER Action
    install | start | stop | restart | remove | status

.EXAMPLE
    .\install-service.ps1 install -InstallDir C:\RPA\sam-callback
    .\install-service.ps1 start
    .\install-service.ps1 status
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true, Position = 0)]
    [ValidateSet("install", "start", "stop", "restart", "remove", "status")]
    [string] $Action,

    # Nombre del servicio de Windows.
    [string] $ServiceName = "sam-callback",

    # Carpeta de instalación: contiene .env y el entorno virtual .venv.
    [string] $InstallDir = (Resolve-Path (Join-Path $PSScriptRoot "..\..")).Path,

    # python.exe del entorno virtual; por defecto <InstallDir>\.venv\Scripts\python.exe
    [string] $Python = "",

    # nssm.exe; por defecto el del PATH o <InstallDir>\tools\nssm.exe
    [string] $Nssm = "",

    # Carpeta de logs; por defecto LOG_DIRECTORIO (o LOG_DIRECTORY) del .env, o C:\RPA\Logs\SAM
    [string] $LogDir = "",

    # Cuenta del servicio (p. ej. DOMINIO\svc-sam-callback); por defecto LocalSystem.
    # Con SQL Server y autenticación de Windows (sin SQL_SAM_UID), esta es la cuenta que se conecta.
    [string] $Account = "",
    [securestring] $Password = $null,

    # Crea una regla de entrada en el firewall de Windows para el puerto del servicio.
    [switch] $OpenFirewall
)

$ErrorActionPreference = "Stop"
Set-StrictMode -Version Latest

# Segundos que el servicio necesita para pararse ordenadamente (uvicorn espera hasta 30 s).
$GracefulStopMs = 35000

function Read-DotEnv([string] $Path) {
    # Lee KEY=VALUE del .env (sin interpretar comillas complejas): solo para rutas y puerto.
    $values = @{}
    if (Test-Path -LiteralPath $Path) {
        foreach ($line in Get-Content -LiteralPath $Path -Encoding UTF8) {
            $text = $line.Trim()
            if ($text -eq "" -or $text.StartsWith("#") -or -not $text.Contains("=")) { continue }
            $key, $value = $text.Split("=", 2)
            $values[$key.Trim().ToUpperInvariant()] = $value.Trim().Trim('"').Trim("'")
        }
    }
    return $values
}

function Resolve-Nssm {
    if ($Nssm -ne "") { return $Nssm }
    $local = Join-Path $InstallDir "tools\nssm.exe"
    if (Test-Path -LiteralPath $local) { return $local }
    $found = Get-Command "nssm.exe" -ErrorAction SilentlyContinue
    if ($null -ne $found) { return $found.Source }
    throw "No se encuentra nssm.exe: póngalo en el PATH, en $local o indíquelo con -Nssm"
}

function Invoke-Nssm {
    # Ejecuta nssm y falla con su mensaje si devuelve error.
    & $script:NssmExe @args
    if ($LASTEXITCODE -ne 0) { throw "nssm $($args -join ' ') terminó con código $LASTEXITCODE" }
}

function Test-ServiceExists {
    return $null -ne (Get-Service -Name $ServiceName -ErrorAction SilentlyContinue)
}

$script:NssmExe = Resolve-Nssm
$dotenv = Read-DotEnv (Join-Path $InstallDir ".env")
if ($Python -eq "") { $Python = Join-Path $InstallDir ".venv\Scripts\python.exe" }
if ($LogDir -eq "") {
    # Primero los nombres actuales de SAM, como los lee el servicio.
    $LogDir = @($dotenv["LOG_DIRECTORIO"], $dotenv["LOG_DIRECTORY"], "C:\RPA\Logs\SAM") |
        Where-Object { $_ } | Select-Object -First 1
}
if (-not [System.IO.Path]::IsPathRooted($LogDir)) { $LogDir = Join-Path $InstallDir $LogDir }
$port = @($dotenv["CALLBACK_PUERTO"], $dotenv["CALLBACK_SERVER_PORT"], "8008") | Where-Object { $_ } | Select-Object -First 1

switch ($Action) {
    "install" {
        if (Test-ServiceExists) { throw "El servicio $ServiceName ya existe: use 'remove' antes de reinstalarlo" }
        if (-not (Test-Path -LiteralPath $Python)) { throw "No existe $Python (cree el entorno: uv sync --no-dev --locked)" }
        if (-not (Test-Path -LiteralPath (Join-Path $InstallDir ".env"))) {
            Write-Warning "No hay $InstallDir\.env: el servicio usará solo variables de entorno del sistema"
        }
        New-Item -ItemType Directory -Force -Path $LogDir | Out-Null

        # Comprobación previa con la misma configuración que usará el servicio.
        Push-Location $InstallDir
        try {
            & $Python -m sam.callback check
            if ($LASTEXITCODE -eq 2) { throw "La configuración no es válida (ver mensajes anteriores)" }
            if ($LASTEXITCODE -ne 0) { Write-Warning "'sam-callback check' avisa de problemas; revise antes de arrancar" }
        } finally { Pop-Location }

        Invoke-Nssm install $ServiceName $Python
        Invoke-Nssm set $ServiceName AppParameters "-m sam.callback serve"
        Invoke-Nssm set $ServiceName AppDirectory $InstallDir
        Invoke-Nssm set $ServiceName DisplayName "SAM Callback (A360)"
        Invoke-Nssm set $ServiceName Description "Recibe los callbacks de Automation Anywhere A360 y actualiza SAM (Ejecuciones)"
        Invoke-Nssm set $ServiceName Start SERVICE_DELAYED_AUTO_START
        # Sin secretos aquí: el .env de AppDirectory los aporta.
        Invoke-Nssm set $ServiceName AppEnvironmentExtra "PYTHONUNBUFFERED=1" "PYTHONIOENCODING=utf-8"

        # Salida del proceso (incluye errores de arranque previos al log propio), con rotación.
        Invoke-Nssm set $ServiceName AppStdout (Join-Path $LogDir "sam_callback_service.out.log")
        Invoke-Nssm set $ServiceName AppStderr (Join-Path $LogDir "sam_callback_service.err.log")
        Invoke-Nssm set $ServiceName AppStdoutCreationDisposition 4
        Invoke-Nssm set $ServiceName AppStderrCreationDisposition 4
        Invoke-Nssm set $ServiceName AppRotateFiles 1
        Invoke-Nssm set $ServiceName AppRotateOnline 1
        Invoke-Nssm set $ServiceName AppRotateSeconds 86400
        Invoke-Nssm set $ServiceName AppRotateBytes 10485760

        # Parada ordenada: Ctrl+C a la consola y espera; luego WM_CLOSE, hilos y, al final, terminar.
        Invoke-Nssm set $ServiceName AppStopMethodSkip 0
        Invoke-Nssm set $ServiceName AppStopMethodConsole $GracefulStopMs
        Invoke-Nssm set $ServiceName AppStopMethodWindow 5000
        Invoke-Nssm set $ServiceName AppStopMethodThreads 5000
        Invoke-Nssm set $ServiceName AppKillProcessTree 1

        # Reinicio si el proceso muere; un error de configuración (código 2) no se reintenta.
        Invoke-Nssm set $ServiceName AppExit Default Restart
        Invoke-Nssm set $ServiceName AppExit 2 Exit
        Invoke-Nssm set $ServiceName AppRestartDelay 5000
        Invoke-Nssm set $ServiceName AppThrottle 10000

        if ($Account -ne "") {
            if ($null -eq $Password) { $Password = Read-Host "Contraseña de $Account" -AsSecureString }
            $plain = [System.Net.NetworkCredential]::new("", $Password).Password
            Invoke-Nssm set $ServiceName ObjectName $Account $plain
            Write-Host "Conceda a $Account permiso de modificación sobre $LogDir y la carpeta del spool."
        }
        if ($OpenFirewall) {
            New-NetFirewallRule -DisplayName "sam-callback ($port/TCP)" -Direction Inbound -Protocol TCP `
                -LocalPort $port -Action Allow -Profile Domain | Out-Null
        }
        Write-Host "Servicio $ServiceName instalado (puerto $port, logs en $LogDir). Arránquelo con: .\install-service.ps1 start"
    }
    "start" {
        Invoke-Nssm start $ServiceName
        Write-Host "Compruebe el estado con: .\install-service.ps1 status"
    }
    "stop" {
        Invoke-Nssm stop $ServiceName
    }
    "restart" {
        Invoke-Nssm restart $ServiceName
    }
    "remove" {
        if (-not (Test-ServiceExists)) { Write-Host "El servicio $ServiceName no existe"; break }
        $service = Get-Service -Name $ServiceName
        if ($service.Status -ne "Stopped") { Invoke-Nssm stop $ServiceName }
        Invoke-Nssm remove $ServiceName confirm
        Get-NetFirewallRule -DisplayName "sam-callback ($port/TCP)" -ErrorAction SilentlyContinue | Remove-NetFirewallRule
        Write-Host "Servicio $ServiceName eliminado. El spool, los logs y el .env se conservan."
    }
    "status" {
        & $script:NssmExe status $ServiceName
        Push-Location $InstallDir
        # Sin --url: la dirección (y https si hay certificado) sale del mismo .env que usa el servicio.
        try { & $Python -m sam.callback status } finally { Pop-Location }
        exit $LASTEXITCODE
    }
}
